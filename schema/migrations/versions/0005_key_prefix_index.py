"""index keys in code-point order: `enrich query --prefix` reads a key range instead of the whole table

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# A prefix is the key range [prefix, successor(prefix)) in code-point order (schema.repository.key_range).
# The (bucket, key) index is ordered by the database's collation (en_US.UTF-8 here), in which that range
# is not contiguous, so a prefix query scanned the table by updated_at: ~1.9 s on a million rows, and as
# long for a prefix that matches nothing. Postgres's "C" collation is code-point order for UTF-8; SQLite
# compares text that way by default. A plain CREATE INDEX holds writes while it builds (seconds per
# million rows): a worker's upsert waits, or ends in its statement timeout and is retried, never lost.
INDEX = "ix_enrichments_key_codepoint"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f'CREATE INDEX {INDEX} ON enrichments ((key COLLATE "C"))')
    else:
        op.create_index(INDEX, "enrichments", ["key"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="enrichments")
