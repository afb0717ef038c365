"""Postgres storage shared by every service: pool, migrations and repositories."""
