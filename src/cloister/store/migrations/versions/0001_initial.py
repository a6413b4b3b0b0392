"""The first schema: meta, sessions, secrets, nonces, the change chain, audit, recovery kit.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _seq() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "meta",
        sa.Column("k", sa.String(128), primary_key=True),
        sa.Column("v", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "sessions",
        sa.Column("name", sa.String(512), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("creator", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("document", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "secrets",
        sa.Column("session", sa.String(512), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "nonces",
        sa.Column("nonce", sa.String(128), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("used", sa.Boolean, nullable=False),
    )
    op.create_table(
        "changes",
        sa.Column("seq", _seq(), primary_key=True, autoincrement=False),
        sa.Column("prev", sa.LargeBinary, nullable=False),
        sa.Column("tbl", sa.String(16), nullable=False),
        sa.Column("key", sa.String(800), nullable=False),
        sa.Column("digest", sa.LargeBinary, nullable=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
        sa.Column("mac", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("seq", _seq(), primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "kit",
        sa.Column("k", sa.String(64), primary_key=True),
        sa.Column("v", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    for table in ("kit", "audit", "changes", "nonces", "secrets", "sessions", "meta"):
        op.drop_table(table)
