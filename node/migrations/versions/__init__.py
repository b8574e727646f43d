"""Alembic revisions of the node database, oldest first by ``down_revision``."""
