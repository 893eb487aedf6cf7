"""The first schema: records, snapshots (the mark), meta (the salt), usage (bytes held).

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "meta", sa.Column("key", sa.String(32), primary_key=True), sa.Column("value", sa.Text, nullable=False)
    )
    op.create_table(
        "snapshots",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),  # claimed → written → retired
        sa.Column("records", sa.Integer, nullable=False),
        sa.Column("shard", sa.Text),  # the shard's file name, set once written
        sa.Column("sha256", sa.String(64)),
        sa.Column("md5", sa.String(32)),  # what its .dvc file names
    )
    op.create_table(
        "records",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("submitter", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("label", sa.Integer, nullable=False),
        sa.Column("answer", sa.Integer, nullable=False),
        sa.Column("probabilities", sa.Text, nullable=False),  # JSON, as the shard's header has them
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("upload_type", sa.Text, nullable=False),
        sa.Column("upload_size", sa.BigInteger, nullable=False),
        sa.Column("target", sa.String(40), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("image", sa.LargeBinary),  # 28×28 little-endian float32; none for a review
        sa.Column("upload", sa.LargeBinary, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),  # what it counts against the store's bound
        sa.Column("snapshot", sa.Integer, sa.ForeignKey("snapshots.id")),  # the snapshot that took it
        sa.CheckConstraint("kind IN ('correction', 'review')", name="records_kind"),
    )
    unsnapshotted = sa.text("snapshot IS NULL")
    op.create_index("records_new", "records", ["id"], sqlite_where=unsnapshotted, postgresql_where=unsnapshotted)
    op.create_index("records_snapshot", "records", ["snapshot"])
    op.create_table(
        "usage",
        sa.Column("writer", sa.String(128), primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in ("usage", "records", "snapshots", "meta"):
        op.drop_table(table)
