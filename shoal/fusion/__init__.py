"""Cooperative learning by weighted-average model fusion (paper 003).

``algorithm`` and ``topology`` are pure functions (the rule and the schedules) and ``strategy`` the
configurable schedule object built on them; ``runner`` is the in-process batched engine,
``flower_app`` the ServerApp and ClientApp on Flower and ``federation`` their deployment (with
``fleet_gate``); ``datasets`` holds the paper's data and shards, ``sources`` a site's own data,
``export`` publishes a fused model, ``cli`` is ``shoal fuse``. Importing this package imports neither
torch nor flwr.
"""
