"""Result storage for a cluster gateway (``shoal cluster --store-results``): each request's inputs and
outputs, kept for later. Metadata rows go to a SQL database (SQLite or PostgreSQL, table
``shoal_results``, made by migrations); tensors go to segment files, one per write batch, under one
folder per hour. docs/result-storage.md describes the layout.

| module | job |
|---|---|
| ``schema.py``, ``migrations/`` | the table and how it is made and changed |
| ``segments.py`` | how a batch's tensors are laid out in a file and described in rows (pure) |
| ``writer.py`` | the queue the request path appends to, and the background writes |
| ``retention.py`` | expiry by age and by total size |
| ``queries.py`` | reading results back |
| ``store.py`` | ``ResultStore``: the life of it all, counters and errors |
"""

from shoal.gateway.storage.store import ResultStore

__all__ = ["ResultStore"]
