"""`enrich db upgrade`: Alembic, configured in code so no alembic.ini has to be found on disk."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from schema.db import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' is ConfigParser interpolation syntax; escape it for passwords that contain one.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


class NewerDatabase(RuntimeError):
    """The database was migrated by a newer enrich than this one (a deployment rolled back)."""


def upgrade(database_url: str, revision: str = "head") -> None:
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            config = alembic_config(database_url)
            config.attributes["connection"] = connection
            _refuse_a_newer_database(config, MigrationContext.configure(connection).get_current_revision())
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def _refuse_a_newer_database(config: Config, current: str | None) -> None:
    # Alembic's own answer is a traceback ending in "Can't locate revision identified by '0006'".
    scripts = ScriptDirectory.from_config(config)
    if current is not None and current not in {script.revision for script in scripts.walk_revisions()}:
        raise NewerDatabase(
            f"the database is at migration {current}, which this enrich does not know (its newest is "
            f"{scripts.get_current_head()}): a newer enrich migrated it; run that version or another database"
        )


def current_revision(database_url: str) -> str | None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
