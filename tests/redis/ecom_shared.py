"""The e-commerce example's workers, sharing one simulated-services state between worker processes.

Test harness only. The example's services (examples/ecommerce_order/services.py)
live in process memory; with two worker processes each would have its own
stock, charges and journal. This module, imported by ``flowdsl worker -w
tests.redis.ecom_shared``, re-registers every worker of the example so that
each call runs under an exclusive lock on a state file named by
``$FLOWDSL_TEST_SERVICES``: load the services' state, run the real worker,
save the state. The state file stands in for the remote systems the services
simulate; it is written with pickle because it holds the services' own
Python objects and never leaves the test's temporary directory (task messages
are JSON).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pickle
from collections.abc import Callable
from typing import Any

import examples.ecommerce_order.workers  # noqa: F401  (registers the example's workers)
from examples.ecommerce_order import services
from flowdsl.workers import registry
from tests.redis.services_file import load_state

_LOCK = asyncio.Lock()


def _shared(fn: Callable[..., Any]) -> Callable[..., Any]:
    async def call(data: dict[str, Any], ctx: Any) -> Any:
        path = os.environ["FLOWDSL_TEST_SERVICES"]
        async with _LOCK:
            with open(path + ".lock", "a+b") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    services.STATE = load_state(path)
                    try:
                        result = fn(data, ctx)
                        if asyncio.iscoroutine(result):
                            result = await result
                    finally:
                        with open(path + ".tmp", "wb") as fh:
                            pickle.dump(services.STATE, fh)
                        os.replace(path + ".tmp", path)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        return result

    call.__module__ = fn.__module__
    call.__qualname__ = getattr(fn, "__qualname__", "call")
    return call


for _name in sorted(registry.names()):
    _found = registry.get(_name)
    if _found is not None and _found.module == "examples.ecommerce_order.workers":
        registry.unregister(_name)
        registry.register(_name, _shared(_found.fn))
