"""Cassandra storage: schema, session, and every query the bridge runs."""
