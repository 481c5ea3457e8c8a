"""The ``bff run`` parent's side of multiprocess metrics (the workers' side is ``bff.metrics``).

The parent makes a private directory, names it in ``PROMETHEUS_MULTIPROC_DIR`` before any worker
starts (workers inherit it; a single-worker run serves from the parent process itself, which has
not imported prometheus-client yet), tells the client when a worker has exited so its live gauges
stop counting, and removes the directory at exit. A directory left by an earlier run is never
reused: stale counters would be summed into the new ones.

This module must not import prometheus-client at import time: the client picks its mode when it
is first imported, which has to be after the variable is set.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ENV", "metrics_dir", "worker_exited"]

ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextmanager
def metrics_dir() -> Iterator[str]:
    """A fresh directory for the workers' metric files, exported in the environment meanwhile."""
    previous = os.environ.get(ENV)
    with tempfile.TemporaryDirectory(prefix="bff-metrics-") as path:
        os.environ[ENV] = path
        try:
            yield path
        finally:
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous


def worker_exited(pid: int) -> None:
    """Drop a dead worker's live gauges (in-flight, open streams); its counters stay summed."""
    path = os.environ.get(ENV)
    if not path:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
