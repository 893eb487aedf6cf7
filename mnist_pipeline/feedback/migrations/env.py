"""Alembic's environment for the feedback store: migrations run on the connection `store.Store` hands over,
inside its transaction (SQLite's write lock or PostgreSQL's advisory lock), so one process upgrades at a time.

A new revision: copy the newest file in versions/, give it the next `revision` and set its
`down_revision` to the one before it. `Store` upgrades every store it opens to the newest.
"""

from alembic import context

context.configure(connection=context.config.attributes["connection"], transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
