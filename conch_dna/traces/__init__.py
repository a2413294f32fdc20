"""The teacher's traces: the trace, the SQLite store, ingest, the upstream teacher, the EGO, and the
teacher cache as a bundle."""
