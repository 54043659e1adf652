"""One BLAS thread for small products run next to other work.

OpenBLAS splits even a small matrix product over every core and its threads spin while
they wait: next to the network's threads (describing) or a server's other requests, a
product of a few milliseconds then takes tens (benchmarks/results/describe.md,
benchmarks/results/serve.md)."""
from __future__ import annotations

import functools

from threadpoolctl import ThreadpoolController


@functools.lru_cache(maxsize=1)
def _controller() -> ThreadpoolController:
    return ThreadpoolController()  # inspects the loaded libraries once (about 15 ms)


def one_blas_thread():
    """A context manager: BLAS runs on one thread inside it (the setting is process-wide)."""
    return _controller().limit(limits=1, user_api="blas")
