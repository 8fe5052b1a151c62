"""The order-management pipeline: parallel checkout checks, then fulfilment beside payments.

``flow.yaml`` is the spec and ``workers.py`` registers its dotted workers;
each operation sleeps for a duration taken from the run input, so the
parallelism shows in the run time (critical path 6 units of 11).
"""
