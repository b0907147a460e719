"""``shoal lab``: the whole system run across emulated machines (network namespaces on one Linux
bridge), faults injected from a seeded schedule, and a checker that counts every request's outcome.

One job per module: ``world`` (namespaces, the bridge, links), ``procs`` (processes run in a
machine), ``deploy`` (central, gateways and workers on their machines), ``observe`` (the gateways'
and central's status polled over the bridge), ``faults`` (the schedule and its injection),
``device`` (the device load driver, a program run on the device machine), ``checker`` (the rules
applied to the logs afterwards), ``plot`` (the timeline), ``run`` (one run end to end) and ``cli``.
See docs/lab.md.
"""
