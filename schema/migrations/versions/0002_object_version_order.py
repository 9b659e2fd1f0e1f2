"""order versions of one key: sequencer and LastModified; latest view ranks by them

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Out-of-order events: a late event for an older version of a key must not become the "latest" row.
LATEST_VIEW_SQL = """
CREATE VIEW enrichments_latest AS
SELECT * FROM (
    SELECT e.*, ROW_NUMBER() OVER (
        PARTITION BY e.bucket, e.key
        ORDER BY e.sequencer DESC NULLS LAST, e.object_last_modified DESC NULLS LAST,
                 e.updated_at DESC, e.id DESC
    ) AS rank_in_image
    FROM enrichments e
) ranked
WHERE rank_in_image = 1
"""

PREVIOUS_VIEW_SQL = """
CREATE VIEW enrichments_latest AS
SELECT * FROM (
    SELECT e.*, ROW_NUMBER() OVER (
        PARTITION BY e.bucket, e.key ORDER BY e.updated_at DESC, e.id DESC
    ) AS rank_in_image
    FROM enrichments e
) ranked
WHERE rank_in_image = 1
"""


def upgrade() -> None:
    # The view selects e.*: drop it before the table changes, recreate it after.
    op.execute("DROP VIEW IF EXISTS enrichments_latest")
    with op.batch_alter_table("enrichments") as batch_op:
        batch_op.add_column(sa.Column("sequencer", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("object_last_modified", sa.DateTime(timezone=True), nullable=True))
    op.execute(LATEST_VIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS enrichments_latest")
    with op.batch_alter_table("enrichments") as batch_op:
        batch_op.drop_column("object_last_modified")
        batch_op.drop_column("sequencer")
    op.execute(PREVIOUS_VIEW_SQL)
