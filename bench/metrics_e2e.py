"""bff's own CPU per proxied GET, this tree against another: ``python -m bench.metrics_e2e DIR``.

``DIR`` holds another version's ``bff`` package, e.g. the one before a change::

    mkdir /tmp/before && git archive <rev> bff | tar -x -C /tmp/before
    python -m bench.metrics_e2e /tmp/before

Each round starts ``bff run --workers 1`` from each tree in turn (real Redis, the test OP, an
echo upstream in this process), logs in, sends ``CALLS`` keep-alive GETs one after another and
reads the worker's user+system CPU from ``/proc``: CPU time, not wall time, so that other load on
the machine disturbs it less. Prints each round and the medians; asserts nothing. Bounded: a fixed
number of rounds and calls.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from tests.support.bff_procs import COOKIE_NAME, EchoUpstream, base_config, login, write_config
from tests.support.procs import OidcProvider, RedisServer, free_port, http_status

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key-" + "x" * 40
CALLS = 3000
ROUNDS = 6


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _one(
    root: str, redis: RedisServer, op: OidcProvider, echo: EchoUpstream, tmp: Path
) -> float:
    """CPU microseconds per proxied GET of ``bff run`` from the tree at ``root``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = await op.register_client(redirect_uris=[f"{url}/bff/callback"])
    config = base_config(
        public_url=url,
        issuer=op.issuer,
        client=client,
        store=redis.url,
        keys=[KEY],
        static=tmp / "static",
        upstreams=[{"path": "/api", "url": f"{echo.url}/v1"}],
    )
    where = Path(tempfile.mkdtemp(dir=tmp))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BFF_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = root
    argv = [
        sys.executable, "-m", "bff", "run", "--config", str(write_config(where, config)),
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(free_port()),
        "--workers", "1",
    ]  # fmt: skip
    proc = await asyncio.to_thread(
        subprocess.Popen, argv, cwd=root, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(300):
            if await asyncio.to_thread(http_status, url + "/readyz") == 200:
                break
            await asyncio.sleep(0.1)
        headers = {"X-CSRF": "1", "Cookie": f"{COOKIE_NAME}={await login(url, 'bench')}"}
        async with aiohttp.ClientSession() as http:
            for i in range(CALLS + 200):  # the first 200 warm up
                if i == 200:
                    started = _cpu(proc.pid)
                async with http.get(f"{url}/api/x", headers=headers) as resp:
                    await resp.read()
            return (_cpu(proc.pid) - started) / CALLS * 1e6
    finally:
        proc.terminate()
        proc.wait(10)


async def main(other: str) -> None:
    roots = {"other": other, "this": str(ROOT)}
    results: dict[str, list[float]] = {name: [] for name in roots}
    with (
        RedisServer() as redis,
        OidcProvider(access_ttl=3600) as op,
        EchoUpstream() as echo,
        tempfile.TemporaryDirectory() as tmp,
    ):
        (Path(tmp) / "static").mkdir()
        for _ in range(ROUNDS):
            for name, root in roots.items():  # interleaved: drift hits both alike
                results[name].append(await _one(root, redis, op, echo, Path(tmp)))
                print(f"{name}: {results[name][-1]:.0f} us CPU per request", flush=True)
    for name, values in results.items():
        print(f"{name}: median {statistics.median(values):.0f} us, min {min(values):.0f} us")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
