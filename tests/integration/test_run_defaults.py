"""`bff run` as a process refuses defaults that would silently break (issue 9, point 6).

A memory:// store with more than one worker: each worker would hold its own sessions, and a user
would be logged out whenever the kernel handed a request to another worker. The real command
exits with code 2 and one line naming both fixes, before it binds any port.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from tests.support.bff_procs import BffProcess, base_config, write_config
from tests.support.procs import HOST


def listening(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(
    ("workers", "config_workers", "expected"),
    [(2, None, 2), (None, 3, 3)],
    ids=["--workers 2", "workers: 3 in the config"],
)
async def test_bff_run_refuses_a_memory_store_with_several_workers(
    tmp_path: Path, workers: int | None, config_workers: int | None, expected: int
) -> None:
    config = base_config(
        public_url="http://127.0.0.1:8080",
        issuer="http://127.0.0.1:1",
        client={"client_id": "c", "client_secret": "s"},
        store="memory://",
        keys=["k" * 43],
        static=tmp_path / "static",
    )
    if config_workers is not None:
        config["workers"] = config_workers
    proc = BffProcess(write_config(tmp_path, config), workers=workers)
    try:
        proc.spawn()
        code = await asyncio.to_thread(proc.wait_exit, 60)
        stderr = (proc.workdir / "stderr.log").read_text()
        assert code == 2, proc.logs()
        assert "Traceback" not in proc.full_logs()
        assert "session.store: memory://" in stderr
        assert f"{expected} workers" in stderr
        assert "Set session.store to a redis:// URL, or run --workers 1" in stderr
        assert not listening(proc.port) and not listening(proc.metrics_port)
    finally:
        proc.close()
