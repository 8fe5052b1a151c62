"""The e-commerce order saga: validate, reserve, charge, confirm, ship, notify.

``flow.yaml`` is the spec, ``workers.py`` registers its workers and
``services.py`` simulates the inventory service, payment gateway and outbox
they talk to (in-process, stateful, idempotent, with scriptable faults).
"""
