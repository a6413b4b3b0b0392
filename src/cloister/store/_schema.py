"""The store's tables (SQLAlchemy Core). The Alembic revisions in ``migrations/`` create them."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

meta_t = sa.Table(
    "meta",
    metadata,
    sa.Column("k", sa.String(128), primary_key=True),
    sa.Column("v", sa.LargeBinary, nullable=False),
)
sessions_t = sa.Table(
    "sessions",
    metadata,
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("creator", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("document", sa.LargeBinary, nullable=False),
)
secrets_t = sa.Table(
    "secrets",
    metadata,
    sa.Column("session", sa.String(512), primary_key=True),
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("value", sa.LargeBinary, nullable=False),
)
nonces_t = sa.Table(
    "nonces",
    metadata,
    sa.Column("nonce", sa.String(128), primary_key=True),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
)
# The hash chain of every change to a protected row (see _chain).
changes_t = sa.Table(
    "changes",
    metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("prev", sa.LargeBinary, nullable=False),
    sa.Column("tbl", sa.String(16), nullable=False),
    sa.Column("key", sa.String(800), nullable=False),
    sa.Column("digest", sa.LargeBinary, nullable=False),
    sa.Column("hash", sa.LargeBinary, nullable=False),
    sa.Column("mac", sa.LargeBinary, nullable=False),
)
# The audit log: sealed, signed, hash-chained entries (see cas.audit).
audit_t = sa.Table(
    "audit",
    metadata,
    sa.Column(
        "seq",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=False,
    ),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
)
# The recovery kit: the store key's shares, each sealed to one recovery key. In clear on
# purpose: it must be readable when the store key is lost.
kit_t = sa.Table(
    "kit",
    metadata,
    sa.Column("k", sa.String(64), primary_key=True),
    sa.Column("v", sa.LargeBinary, nullable=False),
)

PROTECTED = ("meta", "sessions", "secrets", "audit", "kit")
