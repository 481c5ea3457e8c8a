"""Real Redis topologies for integration tests: a Sentinel group and a Cluster, on 127.0.0.1.

Built on ``procs.ChildProcess`` (a child process, its logs in its own temporary directory) like
``RedisServer``, with what those topologies need on top: extra server arguments, ACL users,
sentinel config files, and the waits that make a test robust on a loaded machine (every wait
polls a condition against a generous deadline; nothing sleeps and hopes).

- ``RedisNode``: one ``redis-server`` with any extra arguments; ACL user ``USER``/``PASSWORD``
  (the ``default`` user is off), ``pause()``/``resume()`` (SIGSTOP/SIGCONT: a hung server).
- ``SentinelGroup``: a master, a replica and three sentinels watching ``MASTER_NAME``
  (``down-after-milliseconds`` 1000, so a failover takes a few seconds).
- ``RedisClusterGroup``: six nodes, three masters with one replica each (``cluster-node-timeout``
  2000 ms), formed with ``redis-cli --cluster create``.

Every node and sentinel requires auth: data nodes the ACL user ``USER``, sentinels
``SENTINEL_PASSWORD`` (the ``default`` user): so the tests prove bff authenticates everywhere.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.crc import key_slot

from tests.support.procs import HOST, ChildProcess, free_port
from tests.support.tls import Pki

__all__ = [
    "MASTER_NAME",
    "PASSWORD",
    "SENTINEL_PASSWORD",
    "USER",
    "RedisClusterGroup",
    "RedisNode",
    "SentinelGroup",
    "wait_until",
]

USER = "bff"
PASSWORD = "bff-acl-password"
SENTINEL_PASSWORD = "sentinel-password"
MASTER_NAME = "bffmaster"
ACL = ["--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all"]


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``check`` (every 0.1 s) until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


class RedisNode(ChildProcess):
    """A ``redis-server`` on 127.0.0.1:``port`` with ``args`` appended; ACL user ``USER`` only."""

    name = "redis-node"

    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(port, startup_timeout=startup_timeout)
        self.args = list(args)
        self.tls_port: int | None = None  # set by ``serve_tls``
        self.paused = False

    def serve_tls(self, pki: Pki, *, port: int | None = None) -> None:
        """Also listen with TLS (client certificates required); replicate and gossip over TLS.

        The plain port stays open for the test's own readiness checks.
        """
        self.tls_port = port if port is not None else free_port()
        self.args += [*_tls_args(pki), "--tls-port", str(self.tls_port)]

    @property
    def address(self) -> tuple[str, int]:
        """Where clients are sent (by sentinels, by the cluster): the TLS port when serving TLS."""
        return HOST, self.tls_port if self.tls_port is not None else self.port

    def client(self, **kwargs: Any) -> redis.Redis:
        """A synchronous client on this node only (no cluster redirects), as ``USER``."""
        return redis.Redis(
            host=HOST,
            port=self.port,
            username=USER,
            password=PASSWORD,
            socket_timeout=5,
            socket_connect_timeout=5,
            **kwargs,
        )

    def ping(self) -> bool:
        try:
            with self.client() as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def command(self) -> tuple[Sequence[str], Path, Mapping[str, str] | None]:
        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            *ACL,
            *self.args,
        ]  # fmt: skip
        return argv, self.workdir, None

    def ready(self) -> bool:
        return self.ping()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung Redis)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
        self.paused = False

    def is_live(self) -> bool:
        """Running and not paused: a node the test's own checks may ask."""
        return self.is_running() and not self.paused

    def stop(self) -> None:
        self.resume()  # a stopped process still dies of SIGKILL, but be tidy
        super().stop()

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as r:
            found: dict[str, Any] = r.info(section)
            return found


def _tls_args(pki: Pki) -> list[str]:
    return [
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "yes",
        "--tls-replication", "yes",
    ]  # fmt: skip


def replicated(master: RedisNode, replica: RedisNode) -> Callable[[], bool]:
    """A check: ``replica`` has acknowledged everything ``master`` had written when called.

    Replication is asynchronous; a test that wants to prove "no acknowledged write is lost"
    waits for this before it kills the master.
    """
    target = int(master.info("replication")["master_repl_offset"])

    def check() -> bool:
        info = replica.info("replication")
        return info.get("master_link_status") == "up" and int(info["slave_repl_offset"]) >= target

    return check


class _Sentinel(ChildProcess):
    name = "redis-sentinel"

    def __init__(self, master: RedisNode, pki: Pki | None) -> None:
        super().__init__(None)
        self.master = master
        self.pki = pki
        self.tls_port = free_port() if pki is not None else None

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, password=SENTINEL_PASSWORD, socket_timeout=5)

    def command(self) -> tuple[Sequence[str], Path, Mapping[str, str] | None]:
        conf = self.workdir / "sentinel.conf"
        tls: list[str] = []
        if self.pki is not None:
            args = [*_tls_args(self.pki), "--tls-port", str(self.tls_port)]
            tls = [f"{k[2:]} {v}" for k, v in zip(args[::2], args[1::2], strict=True)]
        host, port = self.master.address
        conf.write_text(
            "\n".join([
                *tls,
                f"port {self.port}",
                f"bind {HOST}",
                f"dir {self.workdir}",
                f"requirepass {SENTINEL_PASSWORD}",
                f"sentinel sentinel-pass {SENTINEL_PASSWORD}",
                f"sentinel monitor {MASTER_NAME} {host} {port} 2",
                f"sentinel auth-user {MASTER_NAME} {USER}",
                f"sentinel auth-pass {MASTER_NAME} {PASSWORD}",
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
                f"sentinel failover-timeout {MASTER_NAME} 10000",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
                "",
            ])
        )  # fmt: skip
        return ["redis-server", str(conf), "--sentinel"], self.workdir, None

    def ready(self) -> bool:
        try:
            with self.client() as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def master_address(self) -> tuple[str, int]:
        with self.client() as r:
            host, port = r.sentinel_get_master_addr_by_name(MASTER_NAME)
        return (host.decode() if isinstance(host, bytes) else host), int(port)

    def master_state(self) -> dict[str, Any]:
        with self.client() as r:
            state: dict[str, Any] = r.sentinel_master(MASTER_NAME)
            return state


class SentinelGroup:
    """A master, a replica and three sentinels (quorum 2); ``url`` names it for bff."""

    def __init__(self, pki: Pki | None = None) -> None:
        """With ``pki``, every node and sentinel also serves TLS and talks TLS to the others."""
        self.pki = pki
        self.master = RedisNode()
        self.replica = RedisNode()
        self.nodes = [self.master, self.replica]
        if pki is not None:
            for node in self.nodes:
                node.serve_tls(pki)
        self.sentinels = [_Sentinel(self.master, pki) for _ in range(3)]

    @property
    def url(self) -> str:
        """``redis+sentinel://`` with the data nodes' ACL user in it (sentinel auth: config);
        ``rediss+sentinel://`` to the sentinels' TLS ports with a ``pki``."""
        if self.pki is None:
            hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
            return f"redis+sentinel://{USER}:{PASSWORD}@{hosts}/{MASTER_NAME}/0"
        hosts = ",".join(f"{HOST}:{s.tls_port}" for s in self.sentinels)
        return f"rediss+sentinel://{USER}:{PASSWORD}@{hosts}/{MASTER_NAME}/0"

    def redis_config(self) -> dict[str, Any]:
        """The ``session.redis`` block bff needs besides ``url``."""
        return {"sentinel_username": "default", "sentinel_password": SENTINEL_PASSWORD}

    def start(self) -> None:
        try:
            self.master.start()
            self.replica.args += [
                "--replicaof", *map(str, self.master.address),
                "--masteruser", USER,
                "--masterauth", PASSWORD,
            ]  # fmt: skip
            self.replica.start()
            wait_until(
                "the replica is in sync",
                lambda: self.replica.info("replication").get("master_link_status") == "up",
            )
            for sentinel in self.sentinels:
                sentinel.start()
            wait_until("the sentinels know each other and the replica", self._formed)
        except BaseException:
            self.close()
            raise

    def _formed(self) -> bool:
        for sentinel in self.sentinels:
            state = sentinel.master_state()
            if int(state["num-other-sentinels"]) != 2 or int(state["num-slaves"]) != 1:
                return False
        return True

    def current_master(self) -> RedisNode:
        """The node the sentinels name as master now."""
        address = self.sentinels[0].master_address()
        return next(n for n in self.nodes if n.address == address)

    def wait_replicated(self) -> None:
        master = self.current_master()
        replica = next(n for n in self.nodes if n is not master)
        wait_until("the replica caught up", replicated(master, replica))

    def wait_failover(self, old: RedisNode, timeout: float = 60.0) -> RedisNode:
        """Wait until every sentinel names another master, which then accepts writes."""

        def promoted() -> bool:
            addresses = {s.master_address() for s in self.sentinels if s.is_running()}
            if addresses == {old.address}:
                return False
            if len(addresses) != 1:
                return False
            node = next(n for n in self.nodes if n.address in addresses)
            return node.info("replication").get("role") == "master"

        wait_until("a replica was promoted", promoted, timeout)
        return self.current_master()

    def close(self) -> None:
        for proc in [*self.sentinels, *self.nodes]:
            proc.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _cluster_port(taken: set[int]) -> int:
    """A free port p <= 55535 whose cluster bus port p + 10000 is free too."""
    for _ in range(1000):
        port = random.randint(20000, 55535)
        if port in taken or port + 10000 in taken:
            continue
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((HOST, candidate))
        except OSError:
            continue
        taken.update((port, port + 10000))
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterGroup:
    """Six ``--cluster-enabled`` nodes: three masters, one replica each; ``url`` names them."""

    def __init__(self, node_timeout_ms: int = 2000, pki: Pki | None = None) -> None:
        """With ``pki``, nodes also serve TLS, gossip and replicate over TLS, and ``url`` is
        ``rediss+cluster://`` to the TLS ports (the cluster names TLS ports to TLS clients)."""
        self.pki = pki
        args = [
            "--cluster-enabled", "yes",
            "--cluster-node-timeout", str(node_timeout_ms),
            # Healthy shards keep serving while one fails over (bff asks for that too).
            "--cluster-require-full-coverage", "no",
            "--masteruser", USER,
            "--masterauth", PASSWORD,
        ]  # fmt: skip
        taken: set[int] = set()
        self.nodes = [RedisNode(args, port=_cluster_port(taken)) for _ in range(6)]
        for node in self.nodes:
            node.args += ["--cluster-config-file", str(node.workdir / "nodes.conf")]
            if pki is not None:
                # With tls-cluster the bus port is the TLS port + 10000: it must be free too.
                node.serve_tls(pki, port=_cluster_port(taken))
                node.args += ["--tls-cluster", "yes"]

    @property
    def url(self) -> str:
        """Two seed nodes are enough to find the rest; no credentials (they go in config)."""
        seeds = ",".join("{}:{}".format(*n.address) for n in self.nodes[:2])
        return f"{'rediss' if self.pki else 'redis'}+cluster://{seeds}"

    def redis_config(self) -> dict[str, Any]:
        return {"username": USER, "password": PASSWORD}

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            argv = [
                "redis-cli", "--user", USER, "--pass", PASSWORD, "--no-auth-warning",
                "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes),
                "--cluster-replicas", "1", "--cluster-yes",
            ]  # fmt: skip
            result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{result.stdout}")
            wait_until("the cluster is formed", self._formed, 90)
        except BaseException:
            self.close()
            raise

    def _formed(self) -> bool:
        for node in self.nodes:
            with node.client() as r:
                info = r.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text or "cluster_known_nodes:6" not in text:
                    return False
                replication = node.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
        return len(self.masters()) == 3 and len(self.pairs()) == 3

    def _by_port(self) -> dict[int, RedisNode]:
        ports = {n.port: n for n in self.nodes}
        ports.update({n.tls_port: n for n in self.nodes if n.tls_port is not None})
        return ports

    def _shards(self) -> list[tuple[int, int, RedisNode, list[RedisNode]]]:
        live = next(n for n in self.nodes if n.is_live())
        with live.client() as r:
            slots = r.execute_command("CLUSTER", "SLOTS")
        by_port = self._by_port()
        out = []
        for entry in slots:
            start, end, master, *replicas = entry
            out.append(
                (
                    int(start),
                    int(end),
                    by_port[int(master[1])],
                    [by_port[int(r[1])] for r in replicas],
                )
            )
        return out

    def masters(self) -> list[RedisNode]:
        return list({id(m): m for _, _, m, _ in self._shards()}.values())

    def master_of(self, key: str) -> RedisNode:
        slot = key_slot(key.encode())
        return next(m for start, end, m, _ in self._shards() if start <= slot <= end)

    def pairs(self) -> list[tuple[RedisNode, RedisNode]]:
        """(master, replica) of every live replica, from the replicas' own INFO.

        Not from CLUSTER SLOTS: Redis 7 leaves out replicas whose offset is still 0.
        """
        by_port = self._by_port()
        out = []
        for node in self.nodes:
            if node.is_live():
                info = node.info("replication")
                if info["role"] == "slave":
                    out.append((by_port[int(info["master_port"])], node))
        return out

    def wait_replicated(self) -> None:
        pairs = self.pairs()
        assert len(pairs) >= 2, f"only {len(pairs)} replicas"
        for master, replica in pairs:
            wait_until("a replica caught up", replicated(master, replica))

    def wait_failover(self, old: RedisNode, timeout: float = 60.0) -> RedisNode:
        """Wait until a live node serves ``old``'s slots as master and the cluster is ok."""

        def promoted() -> bool:
            live = [n for n in self.nodes if n.is_live()]
            for node in live:
                with node.client() as r:
                    info = r.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
            shards = self._shards()
            return all(m is not old and m.is_live() for _, _, m, _ in shards)

        wait_until("a replica took over the dead master's slots", promoted, timeout)
        return self.masters()[0]

    def flush(self) -> None:
        for master in self.masters():
            with master.client() as r:
                r.flushall()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
