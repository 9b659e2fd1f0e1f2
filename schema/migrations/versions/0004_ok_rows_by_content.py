"""index the ok rows by content digest and model: identical bytes are enriched once

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The worker looks up each batch's digests before the forward pass (schema.repository.ok_rows_by_content):
# the same photo under another key, re-uploaded as a new version, or copied into a second bucket takes
# the stored prediction instead of the GPU. Partial: only ok rows are ever reused.
INDEX = "ix_enrichments_content_sha256_model"


def upgrade() -> None:
    op.create_index(
        INDEX,
        "enrichments",
        ["content_sha256", "model_name", "model_version"],
        postgresql_where=sa.text("status = 'ok'"),
        sqlite_where=sa.text("status = 'ok'"),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="enrichments")
