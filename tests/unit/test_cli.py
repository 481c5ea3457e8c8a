"""`bff run` and `bff check-config` refuse defaults that would silently break (issue 9, point 6).

A ``memory://`` store (also the default when ``store:`` is left out) holds the sessions of one
process; with several workers each would have its own, and a user would be logged out whenever the
kernel handed a request to another worker. Both commands refuse that, with exit code 2, the two
fixes named, and no traceback. ``main`` is called with argv; nothing is served.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bff import cli, preflight

BASE = f"""\
public_url: http://127.0.0.1:8080
oidc: {{issuer: "http://127.0.0.1:1", client_id: c, client_secret: s}}
keys: ["{"k" * 43}"]
"""
COOKIE = "cookie: {name: bff-session, secure: false}"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Records what ``bff run`` would serve, instead of serving it."""
    calls: list[tuple[object, ...]] = []

    def fake_supervise(*args: object) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(cli, "_supervise", fake_supervise)
    return calls


def config(tmp_path: Path, extra: str = "", store: str | None = None) -> str:
    """A dev config; ``store`` None leaves ``store:`` out (memory:// by default)."""
    session = (
        f"session: {{{COOKIE}}}" if store is None else f"session: {{{COOKIE}, store: {store!r}}}"
    )
    path = tmp_path / "bff.yaml"
    path.write_text(f"{BASE}{session}\n{extra}")
    return str(path)


def assert_refused(capsys: pytest.CaptureFixture[str], code: int, workers: int) -> str:
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out + err
    assert "session.store: memory://" in err
    assert f"{workers} workers" in err
    assert "Set session.store to a redis:// URL, or run --workers 1" in err
    return err


def test_run_refuses_the_default_store_with_the_default_worker_count(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    served: list[tuple[object, ...]],
) -> None:
    monkeypatch.setattr(cli, "available_cpus", lambda: 4)
    code = cli.main(["run", "--config", config(tmp_path)])  # store: left out, no --workers
    assert "one per CPU this process may use" in assert_refused(capsys, code, 4)
    assert served == []


@pytest.mark.parametrize(
    ("argv", "extra", "workers"),
    [
        (["--workers", "2"], "", 2),
        ([], "workers: 3\n", 3),
        (["--workers", "2"], "workers: 1\n", 2),  # the flag wins over the config
    ],
)
def test_run_refuses_an_explicit_memory_store_with_several_workers(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    served: list[tuple[object, ...]],
    argv: list[str],
    extra: str,
    workers: int,
) -> None:
    code = cli.main(["run", "--config", config(tmp_path, extra, "memory://"), *argv])
    assert_refused(capsys, code, workers)
    assert served == []


@pytest.mark.parametrize(("argv", "extra"), [(["--workers", "1"], ""), ([], "workers: 1\n")])
def test_run_serves_a_memory_store_with_one_worker(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    served: list[tuple[object, ...]],
    argv: list[str],
    extra: str,
) -> None:
    monkeypatch.setattr(cli, "available_cpus", lambda: 4)
    assert cli.main(["run", "--config", config(tmp_path, extra), *argv]) == 0
    assert "with 1 worker(s); /metrics on 127.0.0.1:9464" in capsys.readouterr().out
    assert len(served) == 1
    _path, _text, _settings, _host, _port, workers, _metrics_port = served[0]
    assert workers == 1  # still under the supervisor: restarts and reloads work the same


def test_run_refuses_zero_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: list[tuple[object, ...]]
) -> None:
    assert cli.main(["run", "--config", config(tmp_path), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert served == []


def test_check_config_refuses_memory_when_this_machine_would_run_several_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "available_cpus", lambda: 8)
    code = cli.main(["check-config", "--offline", config(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "configuration is valid" not in out
    assert "one per CPU this process may use" in err
    assert "Set session.store to a redis:// URL, or run --workers 1" in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("cores", "extra"),
    [
        (8, "workers: 1\n"),  # told to run one worker
        (1, ""),  # one core: one worker by default
    ],
)
def test_check_config_accepts_memory_with_one_worker(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cores: int,
    extra: str,
) -> None:
    monkeypatch.setattr(cli, "available_cpus", lambda: cores)
    assert cli.main(["check-config", "--offline", config(tmp_path, extra)]) == 0
    assert "configuration is valid" in capsys.readouterr().out


def test_check_config_accepts_redis_with_every_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "available_cpus", lambda: 8)
    path = config(tmp_path, store="redis://127.0.0.1:6379/0")
    assert cli.main(["check-config", "--offline", path]) == 0
    assert "configuration is valid" in capsys.readouterr().out


def test_run_metrics_port_flag_overrides_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: list[tuple[object, ...]]
) -> None:
    path = config(tmp_path, "metrics: {listen: {host: 127.0.0.2, port: 9500}}\n")
    assert cli.main(["run", "--config", path, "--workers", "1", "--metrics-port", "9999"]) == 0
    assert "/metrics on 127.0.0.2:9999" in capsys.readouterr().out
    assert served[0][6] == 9999


# --- issue 10, point 8: one shape for every command ---------------------------------------------

ROOT = Path(__file__).resolve().parent.parent.parent


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"bff {importlib.metadata.version('bff')}\n"


@pytest.mark.parametrize("form", ["positional", "--config", "BFF_CONFIG", "both, the same"])
def test_check_config_takes_the_config_like_every_command(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    form: str,
) -> None:
    path = config(tmp_path, "workers: 1\n")
    monkeypatch.delenv("BFF_CONFIG", raising=False)
    argv = {
        "positional": [path],
        "--config": ["--config", path],
        "BFF_CONFIG": [],
        "both, the same": [path, "--config", path],
    }[form]
    if form == "BFF_CONFIG":
        monkeypatch.setenv("BFF_CONFIG", path)
    assert cli.main(["check-config", "--offline", *argv]) == 0
    assert capsys.readouterr().out == f"{path}: configuration is valid\n"


def test_check_config_refuses_two_different_files_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "workers: 1\n")
    other = str(tmp_path / "other.yaml")
    assert cli.main(["check-config", "--offline", path, "--config", other]) == 2
    assert "two config files given" in capsys.readouterr().err
    monkeypatch.delenv("BFF_CONFIG", raising=False)
    assert cli.main(["check-config", "--offline"]) == 2
    assert "no config file: pass --config FILE or set BFF_CONFIG" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        ("7.0.15", None),
        ("7.4.0", None),
        ("8.0.1", None),
        ("6.2.14", "is Redis 6.2.14; bff needs Redis 7 or newer"),
        ("5.0.7", "is Redis 5.0.7; bff needs Redis 7 or newer"),
        ("?", "answers an unrecognised version '?'; bff needs Redis 7 or newer"),
    ],
)
def test_redis_older_than_7_is_refused(version: str, problem: str | None) -> None:
    assert preflight.redis_version_problem(version) == problem


def test_static_needs_a_folder_with_an_index_html(tmp_path: Path) -> None:
    assert "is not a directory" in (preflight.static_problem(tmp_path / "nope") or "")
    assert "has no index.html" in (preflight.static_problem(tmp_path) or "")
    (tmp_path / "index.html").write_text("<!doctype html>")
    assert preflight.static_problem(tmp_path) is None


def test_check_config_show_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    # 400 routes: the dump is far larger than a pipe's buffer, so bff is still writing when head
    # exits after its first line, and the next write meets the closed pipe.
    routes = "".join(f"  - {{path: /api/r{i}, url: http://r{i}.internal}}\n" for i in range(400))
    path = config(tmp_path, f"workers: 1\nupstreams:\n{routes}")
    first, code, err = pipe_into_head(
        [sys.executable, "-m", "bff", "check-config", path, "--show", "--offline"]
    )
    assert first == f"{path}: configuration is valid\n"
    assert err == ""  # no traceback, no "Exception ignored" at exit
    assert code == 141  # as if SIGPIPE had ended it, like any Unix tool


def pipe_into_head(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, int, str]:
    """``argv | head -1``: head's output, the command's exit code and its stderr."""
    with subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as producer:
        assert producer.stdout is not None and producer.stderr is not None
        head = subprocess.run(
            ["head", "-1"], stdin=producer.stdout, capture_output=True, text=True, timeout=60
        )
        producer.stdout.close()  # head was its only reader; now it has none
        err = producer.stderr.read().decode()
        code = producer.wait(timeout=60)
    return head.stdout, code, err


@pytest.mark.parametrize(
    ("extra", "public_url", "needle"),
    [
        (
            "upstreams: [{path: /api, url: 'http://api.internal', scopes: [orders:read]}]\n",
            None,
            "upstreams[0].scopes: orders:read not in oidc.scopes",
        ),
        ("", "http://app.example.com", "public_url: must be https://"),
    ],
)
def test_run_refuses_a_config_that_cannot_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    served: list[tuple[object, ...]],
    extra: str,
    public_url: str | None,
    needle: str,
) -> None:
    """What would fail on every request is refused at start, as check-config refuses it."""
    path = Path(config(tmp_path, "workers: 1\n" + extra, "memory://"))
    if public_url:
        path.write_text(path.read_text().replace("http://127.0.0.1:8080", public_url))
    for argv in (["run", "--config", str(path)], ["check-config", "--offline", str(path)]):
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert needle in err and "Traceback" not in out + err
    assert served == []
