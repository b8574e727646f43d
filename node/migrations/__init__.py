"""Alembic migrations of the node database; applied by :func:`node.db.init_db`."""
