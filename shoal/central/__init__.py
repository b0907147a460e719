"""The central directory (``shoal central``): accounts, the live table of clusters, route choice with
signed route tokens, commands relayed to devices, a webhook, a status API and page.

Nothing here imports torch; the database layer (SQLAlchemy, Alembic) is imported only by the server
and the command line when they run.
"""
