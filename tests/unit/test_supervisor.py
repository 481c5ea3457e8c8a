"""The ``bff run`` parent's decisions that need no process: worker count and restart backoff."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bff import supervisor
from bff.config import parse_settings
from bff.supervisor import Supervisor, _Worker, available_cpus, bind_slots
from bff.worker import _watch_parent

CONFIG = f"""\
public_url: http://127.0.0.1:8080
oidc: {{issuer: "http://127.0.0.1:1", client_id: c, client_secret: s}}
keys: ["{"k" * 43}"]
"""


@pytest.fixture
def affinity(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_cpus(n: int) -> None:
        monkeypatch.setattr(supervisor.os, "sched_getaffinity", lambda pid: set(range(n)))

    return set_cpus


def test_the_affinity_mask_counts_not_the_host(affinity: Any, tmp_path: Path) -> None:
    affinity(3)
    assert available_cpus(tmp_path) == 3  # no cgroup files: the mask alone


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", 8),  # no quota
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # 1.5 CPUs round up
        ("50000 100000\n", 1),  # never 0
        ("1600000 100000\n", 8),  # a quota above the mask: the mask
    ],
)
def test_a_cgroup_v2_quota_caps_the_count(
    affinity: Any, tmp_path: Path, cpu_max: str, expected: int
) -> None:
    affinity(8)
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert available_cpus(tmp_path) == expected


@pytest.mark.parametrize(("quota", "expected"), [("-1", 8), ("300000", 3), ("250000", 3)])
def test_a_cgroup_v1_cfs_quota_caps_the_count(
    affinity: Any, tmp_path: Path, quota: str, expected: int
) -> None:
    affinity(8)
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(tmp_path) == expected


class _Proc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


def test_a_crash_loop_backs_off_and_a_stable_worker_restarts_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(supervisor.time, "monotonic", lambda: now[0])
    settings = parse_settings(CONFIG)
    with socket.socket() as sock:
        sup = Supervisor("bff.yaml", CONFIG, settings, [sock])
        procs: list[_Proc] = []

        def start(slot: int) -> None:
            proc = _Proc(len(procs) + 1)
            procs.append(proc)
            sup.slots[slot] = _Worker(slot, proc, started=now[0])  # type: ignore[arg-type]

        monkeypatch.setattr(sup, "_start", start)
        ended: list[int] = []
        sup.on_exit.append(ended.append)
        start(0)
        delays = []
        for _ in range(9):  # each worker dies 1 s after it started
            now[0] += 1
            procs[-1].code = 1
            sup._reap()
            due = sup.restart_at[0]
            assert due is not None
            delays.append(due - now[0])
            now[0] = due
            sup._reap()  # restarts it
        assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
        assert sup.restarts == 9 and len(procs) == 10
        assert ended == list(range(1, 10))  # every dead worker's pid, once
        now[0] += supervisor.STABLE_AFTER  # this one lived long enough: not a loop
        procs[-1].code = -9
        sup._reap()
        assert sup.restart_at[0] == now[0]
        sup._reap()
        assert len(procs) == 11


async def test_without_pdeathsig_a_worker_notices_its_parent_is_gone() -> None:
    stop = asyncio.Event()
    await asyncio.wait_for(_watch_parent(-1, stop), 5)  # -1 is nobody's parent
    assert stop.is_set()


def test_pdeathsig_is_armed_on_linux() -> None:
    """In a child of its own: the setting would stay on the test process."""
    code = "import os; from bff.worker import die_with_parent; print(die_with_parent(os.getppid()))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == str(sys.platform == "linux")


@pytest.mark.parametrize("count", [1, 3])
def test_a_second_bff_run_on_the_same_port_is_refused(count: int) -> None:
    first = bind_slots("127.0.0.1", 0, count)
    try:
        port = first[0].getsockname()[1]
        assert {s.getsockname()[1] for s in first} == {port} and len(first) == count
        with pytest.raises(OSError):
            bind_slots("127.0.0.1", port, count)
    finally:
        for sock in first:
            sock.close()
    again = bind_slots("127.0.0.1", port, count)  # free again once the first has closed
    for sock in again:
        sock.close()


def _catches(pid: int, signum: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_worker_told_to_stop_before_it_serves_exits_cleanly() -> None:
    """Not death by SIGTERM, which the parent would count as a failed stop."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bff.worker", "--source", "bff.yaml", "--fd", "0",
         "--parent", str(os.getpid())],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _catches(proc.pid, signal.SIGTERM):  # it now waits for its config on stdin
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
