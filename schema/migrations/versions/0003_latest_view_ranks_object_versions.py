"""latest view ranks object versions first, then the rows (model versions) of the newest one

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# 0002 ranked rows by `sequencer DESC NULLS LAST` first, but only event rows have a sequencer: a backfill
# after a model upgrade, a reconciled overwrite whose event was lost, or a retry without it lost to any
# event row. Here each object version is ranked once, from what any of its rows knows (MAX over the
# version), and only then are the rows of the newest version ranked by their write (a newer model's row).
#
# Versions are ordered by LastModified, then sequencer (the tie-break within one second). A version with a
# sequencer but no LastModified (an event whose fetch failed) is at least as new as every version with a
# smaller sequencer, so it takes their newest LastModified: the failed newer version of a key stays the
# latest row (where `enrich retry` finds it), and a late event for an older one stays below the newer.
# A running MAX over the versions in sequencer order, not a correlated subquery: that one scanned every
# version of the table again for each failed fetch. NULLS LAST explicitly: SQLite sorts NULLs first, and a
# version without a sequencer says nothing about the order of those with one.
#
# Inlined, not imported: a migration is a frozen snapshot of the schema at its revision. Plain SQL that
# Postgres and SQLite (>= 3.30, NULLS LAST) both run.
LATEST_VIEW_SQL = """
CREATE VIEW enrichments_latest AS
WITH versions AS (
    SELECT bucket, key, object_version,
           MAX(object_last_modified) AS last_modified, MAX(sequencer) AS sequencer
    FROM enrichments
    GROUP BY bucket, key, object_version
),
ordered_versions AS (
    SELECT bucket, key, object_version, sequencer,
           CASE WHEN last_modified IS NULL AND sequencer IS NOT NULL THEN MAX(last_modified) OVER (
               PARTITION BY bucket, key ORDER BY sequencer NULLS LAST
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING
           ) ELSE last_modified END AS last_modified
    FROM versions
)
SELECT * FROM (
    SELECT e.*, ROW_NUMBER() OVER (
        PARTITION BY e.bucket, e.key
        ORDER BY o.last_modified DESC NULLS LAST, o.sequencer DESC NULLS LAST,
                 e.updated_at DESC, e.id DESC
    ) AS rank_in_image
    FROM enrichments e
    JOIN ordered_versions o
      ON o.bucket = e.bucket AND o.key = e.key AND o.object_version = e.object_version
) ranked
WHERE rank_in_image = 1
"""

# 0002's view, restored by downgrade.
PREVIOUS_VIEW_SQL = """
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


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS enrichments_latest")
    op.execute(LATEST_VIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS enrichments_latest")
    op.execute(PREVIOUS_VIEW_SQL)
