"""The README documents what the code reads: every setting, every command."""

from __future__ import annotations

from schema.settings import Settings
from tests.conftest import REPO


def test_readme_documents_every_setting() -> None:
    readme = (REPO / "README.md").read_text()
    missing = [
        f"ENRICH_{name.upper()}" for name in Settings.model_fields if f"ENRICH_{name.upper()}" not in readme
    ]
    assert missing == []


def test_readme_names_every_command_and_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    for command in (
        "enrich run",
        "enrich worker",
        "enrich ingest webhook",
        "enrich ingest sqs",
        "enrich ingest backfill",
        "enrich query",
        "enrich db upgrade",
        "enrich train",
        "enrich evaluate",
    ):
        assert command in readme
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "scripts/demo" in first_block and "scripts/test" in first_block
    assert "scripts/test" in (REPO / ".ci" / "run").read_text()
