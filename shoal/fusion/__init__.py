"""Cooperative learning by weighted-average model fusion (paper 003).

``algorithm`` and ``topology`` are pure functions (the rule and the schedules); ``runner`` is the
in-process batched engine, ``flower_app`` the engine across machines on Flower, ``datasets`` the data
and shards, ``cli`` the ``shoal fuse`` command. Importing this package imports neither torch nor flwr.
"""
