"""The files in ``deploy/`` are checked here, since CI has no Docker engine and no cluster.

Every YAML file parses; every bff config passes ``bff check-config --offline``; the compose file,
the Kubernetes base, the Dockerfile and the systemd unit are checked for structure and for
agreement with each other and with the bff config they run (ports, paths, env variables, users).
Kubernetes manifests are validated against the bundled API schemas of ``kubernetes-validate``;
``systemd-analyze`` and ``kubectl kustomize`` run where installed. Each checker returns a list of
problems, and a few tests feed it a broken copy to show that it would notice.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bff.config import ConfigError, ShutdownSettings, load_settings, parse_duration

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "bff.service"
LOCK = DEPLOY / "requirements.lock"

# The example configs in deploy/examples/, one per OpenID Provider that docs/operations.md explains.
OP_EXAMPLES = ["auth0", "entra-id", "google", "keycloak", "okta"]
# Every bff config in deploy/ (a test below checks that no other YAML there has `oidc:`).
BFF_CONFIGS = [
    DEPLOY / "bff.example.yaml",
    DEPLOY / "compose" / "bff.yaml",
    K8S / "bff.yaml",
    *(DEPLOY / "examples" / f"{name}.yaml" for name in OP_EXAMPLES),
]
# The environment the configs reference, with values bff accepts (keys: 32+ characters).
DUMMY_ENV = {
    "OIDC_CLIENT_SECRET": "dummy-client-secret",
    "BFF_KEY_CURRENT": "k" * 43,
    "BFF_KEY_PREVIOUS": "p" * 43,
    "BFF_PORT": "8081",
}
# The oldest Kubernetes minor the base targets, and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def stop_seconds(config: Mapping[str, Any]) -> float:
    """How long bff may take to stop after SIGTERM with this config: shutdown.drain + grace."""
    shutdown = config.get("shutdown") or {}
    defaults = ShutdownSettings()
    drain = parse_duration(shutdown["drain"]) if "drain" in shutdown else defaults.drain
    grace = parse_duration(shutdown["grace"]) if "grace" in shutdown else defaults.grace
    return drain + grace


def load_all(path: Path) -> list[Any]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document"
    assert isinstance(docs[0], dict), f"{path}: expected a mapping"
    return docs[0]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def port_of(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}[parts.scheme]


# --- every YAML file, every bff config ----------------------------------------------------------


def test_deploy_has_the_files_an_operator_expects() -> None:
    names = {rel(p) for p in DEPLOY.rglob("*") if p.is_file()}
    expected = {
        "deploy/Dockerfile",
        "deploy/bff.service",
        "deploy/bff.example.yaml",
        "deploy/compose.yaml",
        "deploy/compose/bff.yaml",
        "deploy/compose/nginx.conf",
        "deploy/requirements.lock",
        "deploy/requirements-demo.lock",
        "deploy/kubernetes/kustomization.yaml",
        "deploy/kubernetes/bff.yaml",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/service.yaml",
        "deploy/kubernetes/secret.yaml",
        "deploy/kubernetes/pdb.yaml",
        "deploy/kubernetes/hpa.yaml",
        "deploy/kubernetes/networkpolicy.yaml",
    }
    assert expected <= names, sorted(expected - names)


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_every_yaml_file_parses_into_mappings(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{rel(path)} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{rel(path)}: a document is not a mapping"


def test_the_list_of_bff_configs_is_complete() -> None:
    found = {p for p in yaml_files() if any("oidc" in d for d in load_all(p))}
    assert found == set(BFF_CONFIGS)


def test_the_operations_doc_explains_every_op_example() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for name in OP_EXAMPLES:
        assert f"(../deploy/examples/{name}.yaml)" in doc, name


@pytest.mark.parametrize("path", BFF_CONFIGS, ids=rel)
def test_every_bff_config_passes_check_config_offline(path: Path, tmp_path: Path) -> None:
    target = path
    result = subprocess.run(
        [sys.executable, "-m", "bff", "check-config", "--offline", str(target)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **DUMMY_ENV},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout


def test_check_config_would_refuse_a_broken_deploy_config(tmp_path: Path) -> None:
    broken = tmp_path / "bff.yaml"
    broken.write_text(K8S.joinpath("bff.yaml").read_text().replace("token: user", "token: usr"))
    with pytest.raises(ConfigError):
        load_settings(broken, env=DUMMY_ENV)


# --- deploy/compose.yaml --------------------------------------------------------------------------


def dockerfile_stages(text: str) -> list[tuple[str, list[str]]]:
    """(stage name, instruction lines) per FROM, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    stages: list[tuple[str, list[str]]] = []
    for line in lines:
        if m := re.match(r"(?i)FROM\s+\S+(?:\s+AS\s+(\S+))?$", line):
            stages.append((m.group(1) or str(len(stages)), []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def compose_problems(doc: Mapping[str, Any]) -> list[str]:
    """What is structurally wrong with a compose file, as Docker Compose would see it."""
    problems: list[str] = []
    services: dict[str, Any] = doc.get("services") or {}
    networks = set((doc.get("networks") or {}).keys())
    stage_names = {name for name, _ in dockerfile_stages(DOCKERFILE.read_text())}
    for name, svc in services.items():
        if "image" not in svc and "build" not in svc:
            problems.append(f"{name}: neither image nor build")
        if build := svc.get("build"):
            context = (DEPLOY / build["context"]).resolve()
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"{name}: build.dockerfile not found")
            if build.get("target") and build["target"] not in stage_names:
                problems.append(f"{name}: build.target {build['target']} is no Dockerfile stage")
        mode = svc.get("network_mode")
        if mode is not None:
            owner = mode.removeprefix("service:")
            if not mode.startswith("service:") or owner not in services:
                problems.append(f"{name}: network_mode {mode} names no service")
            if "networks" in svc or "ports" in svc:
                problems.append(f"{name}: network_mode excludes networks and ports")
        for net in svc.get("networks") or []:
            if net not in networks:
                problems.append(f"{name}: network {net} is not declared")
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep not in services:
                problems.append(f"{name}: depends_on {dep} is no service")
            elif cond.get("condition") == "service_healthy" and not has_healthcheck(
                services[dep], services
            ):
                problems.append(f"{name}: waits for {dep} to be healthy, which has no healthcheck")
        for volume in svc.get("volumes") or []:
            source = volume.split(":", 1)[0]
            if source.startswith(".") and not (DEPLOY / source).exists():
                problems.append(f"{name}: volume source {source} does not exist")
        health = svc.get("healthcheck")
        if health is not None and (not health.get("test") or health["test"][0] != "CMD"):
            problems.append(f"{name}: healthcheck.test must be an exec form ['CMD', ...]")
    return problems


def has_healthcheck(svc: Mapping[str, Any], services: Mapping[str, Any]) -> bool:
    """Its own healthcheck, or the HEALTHCHECK of the Dockerfile stage it is built from."""
    if svc.get("healthcheck"):
        return True
    build = svc.get("build")
    if not build:
        return False
    stages = dict(dockerfile_stages(DOCKERFILE.read_text()))
    return any(i.upper().startswith("HEALTHCHECK") for i in stages.get(build["target"], []))


@pytest.fixture
def compose() -> dict[str, Any]:
    return load_one(COMPOSE)


def test_compose_is_structurally_sound(compose: dict[str, Any]) -> None:
    assert compose_problems(compose) == []


def test_compose_checker_notices_broken_files(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    del broken["services"]["redis"]["healthcheck"]  # bff1 and bff2 wait for it to be healthy
    broken["services"]["api"]["network_mode"] = "service:nope"
    broken["services"]["lb"]["networks"] = ["frontend"]
    broken["services"]["op"]["build"]["target"] = "nope"
    broken["services"]["bff2"]["volumes"] = ["./compose/nope.yaml:/etc/bff/bff.yaml:ro"]
    assert sorted(p.split(":")[0] for p in compose_problems(broken)) == [
        "api", "bff1", "bff2", "bff2", "lb", "op",
    ]  # fmt: skip


def test_compose_runs_redis_two_bffs_behind_a_balancer_the_op_and_the_api(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(services) == {"lb", "redis", "op", "api", "bff1", "bff2"}
    bffs = [services["bff1"], services["bff2"]]
    for svc in bffs:
        assert svc["build"]["target"] == "runtime"
        assert svc["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert svc["depends_on"]["op"] == {"condition": "service_healthy"}
        assert "./compose/bff.yaml:/etc/bff/bff.yaml:ro" in svc["volumes"]
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
        # docker compose stop: SIGKILL after stop_grace_period, which must outlast the drain.
        stop = stop_seconds(load_one(DEPLOY / "compose" / "bff.yaml"))
        assert parse_duration(svc["stop_grace_period"]) > stop
    ports = {int(svc["environment"]["BFF_PORT"]) for svc in bffs}
    assert len(ports) == 2, "the two instances share a network namespace: distinct ports"
    nginx = (DEPLOY / "compose" / "nginx.conf").read_text()
    upstream = {int(p) for p in re.findall(r"server 127\.0\.0\.1:(\d+)", nginx)}
    assert upstream == ports, "nginx balances over exactly the bff instances"
    assert services["op"]["build"]["target"] == "demo"


def test_compose_agrees_with_the_bff_config_it_mounts(compose: dict[str, Any]) -> None:
    services = compose["services"]
    config = load_one(DEPLOY / "compose" / "bff.yaml")
    assert config["listen"]["port"] == "${BFF_PORT:-8080}"
    published = {int(p.rsplit(":", 1)[1]) for p in services["lb"]["ports"]}
    assert port_of(config["public_url"]) in published, "the lb publishes the app's port"
    assert port_of(config["oidc"]["issuer"]) in published, "and the OP's, for the browser"
    listen = re.search(r"listen (\d+);", (DEPLOY / "compose" / "nginx.conf").read_text())
    assert listen is not None and int(listen.group(1)) == port_of(config["public_url"])
    op_cmd, api_cmd = services["op"]["command"], services["api"]["command"]
    assert int(op_cmd[op_cmd.index("--port") + 1]) == port_of(config["oidc"]["issuer"])
    assert api_cmd[api_cmd.index("--issuer") + 1] == config["oidc"]["issuer"]
    api_port = int(api_cmd[api_cmd.index("--port") + 1])
    assert [port_of(u["url"]) for u in config["upstreams"]] == [api_port]
    assert urlsplit(config["session"]["store"]).hostname in services
    referenced = set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose" / "bff.yaml").read_text()))
    for svc in (services["bff1"], services["bff2"]):
        assert referenced <= set(svc["environment"]), "every ${VAR} the config uses is set"


# --- deploy/kubernetes/ ---------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    return load_one(K8S / "kustomization.yaml")


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for name in kustomization()["resources"]:
        for doc in load_all(K8S / name):
            yield K8S / name, doc


def by_kind() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for _, doc in manifests()}


def test_kustomization_lists_every_manifest_and_only_existing_files() -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    listed = set(k["resources"])
    generated = {f for g in k["configMapGenerator"] for f in g["files"]}
    assert all((K8S / f).is_file() for f in listed | generated)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed | generated, "a manifest on disk that the base does not apply"
    kinds = sorted(doc["kind"] for _, doc in manifests())
    assert kinds == sorted(
        [
            "Deployment",
            "Service",
            "Secret",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
        ]
    )
    assert [g["name"] for g in k["configMapGenerator"]] == ["bff-config"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_matches_the_kubernetes_api_schema(version: str) -> None:
    for path, doc in manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{rel(path)} ({doc['kind']}), Kubernetes {version}: {exc.message}")


def test_the_schema_check_notices_a_misspelt_field() -> None:
    deployment = copy.deepcopy(by_kind()["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def deployment_problems(deployment: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """What is wrong with the Deployment, given the bff.yaml it runs."""
    problems: list[str] = []
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    if not spec["selector"]["matchLabels"].items() <= labels.items():
        problems.append("selector does not match the pod's labels")
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if ports.get("http") != config["listen"]["port"]:
        problems.append("port http is not listen.port")
    metrics = (config.get("metrics") or {}).get("listen") or {}
    if ports.get("metrics") != metrics.get("port"):
        problems.append("port metrics is not metrics.listen.port")
    if metrics.get("host") != "0.0.0.0":
        problems.append("metrics.listen.host must be 0.0.0.0 for Prometheus to reach it")
    annotations = spec["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/port") != str(metrics.get("port")):
        problems.append("prometheus.io/port is not the metrics port")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ports:
            problems.append(f"{probe} must GET {path} on a declared container port")
    if not {"requests", "limits"} <= set(container.get("resources", {})):
        problems.append("resources need requests and limits")
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    if pod_sc.get("runAsNonRoot") is not True or not pod_sc.get("runAsUser"):
        problems.append("pod must run as a non-root uid")
    if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("seccompProfile must be RuntimeDefault")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation must be false")
    if sc.get("capabilities", {}).get("drop") != ["ALL"]:
        problems.append("capabilities must drop ALL")
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if len(command) != 2 or command[0] != "sleep" or not command[1].isdigit():
        problems.append("preStop must be a plain sleep")
    elif int(command[1]) + stop_seconds(config) >= pod.get("terminationGracePeriodSeconds", 30):
        problems.append(
            "terminationGracePeriodSeconds leaves no room after preStop + drain + grace"
        )
    if pod.get("enableServiceLinks") is not False:
        problems.append("enableServiceLinks must be false: the Service bff would set BFF_PORT")
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    args = container.get("args", [])
    if "--config" not in args or not args[args.index("--config") + 1].startswith(
        mounts.get("config", "?") + "/"
    ):
        problems.append("--config is not in the mounted ConfigMap")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if volumes.get("config", {}).get("configMap", {}).get("name") != "bff-config":
        problems.append("the config volume is not the bff-config ConfigMap")
    return problems


@pytest.fixture
def k8s_config() -> dict[str, Any]:
    return load_one(K8S / "bff.yaml")


def test_the_deployment_is_sound_and_runs_its_config(k8s_config: dict[str, Any]) -> None:
    assert deployment_problems(by_kind()["Deployment"], k8s_config) == []


def test_the_deployment_checker_notices_broken_manifests(k8s_config: dict[str, Any]) -> None:
    deployment = copy.deepcopy(by_kind()["Deployment"])
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["readinessProbe"]["httpGet"]["port"] = "web"
    container["securityContext"]["readOnlyRootFilesystem"] = False
    del container["securityContext"]["capabilities"]
    pod["terminationGracePeriodSeconds"] = 35  # preStop 5 + drain 5 + grace 25: no margin
    pod["securityContext"]["seccompProfile"]["type"] = "Unconfined"
    del pod["enableServiceLinks"]
    assert len(deployment_problems(deployment, k8s_config)) == 6
    config = copy.deepcopy(k8s_config)
    config["listen"]["port"] = 8000
    config["metrics"]["listen"]["host"] = "127.0.0.1"
    assert len(deployment_problems(by_kind()["Deployment"], config)) == 2


def test_selectors_and_references_point_at_the_bff_pods() -> None:
    kinds = by_kind()
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    service = kinds["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= port_names
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
        assert kinds[kind]["spec"][key]["matchLabels"].items() <= labels.items(), kind
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": kinds["Deployment"]["metadata"]["name"],
    }
    assert hpa["minReplicas"] >= 2, "one pod alone cannot roll without downtime"
    pdb = kinds["PodDisruptionBudget"]["spec"]
    assert pdb.get("maxUnavailable", 0) < hpa["minReplicas"]


def test_the_secret_feeds_every_variable_the_config_uses(k8s_config: dict[str, Any]) -> None:
    kinds = by_kind()
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    secret = kinds["Secret"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    referenced = set(re.findall(r"\$\{(\w+)", (K8S / "bff.yaml").read_text()))
    assert referenced <= set(env)
    for ref in env.values():
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]


def test_the_secret_holds_placeholders_that_bff_refuses(tmp_path: Path) -> None:
    """A base applied as it is must not run with published keys: bff refuses them at start."""
    secret = by_kind()["Secret"]["stringData"]
    assert all(v.startswith("REPLACE-ME") for v in secret.values())
    placeholder_env = {
        "OIDC_CLIENT_SECRET": secret["oidc-client-secret"],
        "BFF_KEY_CURRENT": secret["bff-key-current"],
        "BFF_KEY_PREVIOUS": secret["bff-key-previous"],
    }
    with pytest.raises(ConfigError) as exc:
        load_settings(K8S / "bff.yaml", env=placeholder_env)
    assert "keys[0]" in str(exc.value) and "keys[1]" in str(exc.value)


def test_the_network_policy_admits_the_ingress_and_reaches_what_the_config_names(
    k8s_config: dict[str, Any],
) -> None:
    policy = by_kind()["NetworkPolicy"]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    ingress = {
        (
            rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            port["port"],
        )
        for rule in policy["ingress"]
        for port in rule["ports"]
    }
    assert ingress == {("ingress-nginx", "http"), ("monitoring", "metrics")}
    egress_ports = {(p["port"], p["protocol"]) for r in policy["egress"] for p in r["ports"]}
    needed = {
        (53, "UDP"),
        (53, "TCP"),
        (port_of(k8s_config["session"]["store"]), "TCP"),
        (port_of(k8s_config["oidc"]["issuer"]), "TCP"),
        *((port_of(u["url"]), "TCP") for u in k8s_config["upstreams"]),
    }
    assert needed <= egress_ports, sorted(needed - egress_ports)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_builds_the_base() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    built = {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout) if doc}
    configmap = built["ConfigMap"]
    assert configmap["metadata"]["name"].startswith("bff-config-"), "a content-hashed name"
    assert yaml.safe_load(configmap["data"]["bff.yaml"]) == load_one(K8S / "bff.yaml")
    volumes = built["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": configmap["metadata"]["name"]}} in volumes


# --- deploy/Dockerfile and the lock file ----------------------------------------------------------


def dockerfile_problems(text: str) -> list[str]:
    problems: list[str] = []
    stages = dockerfile_stages(text)
    if len(stages) < 2:
        return ["not multi-stage"]
    name, final = stages[-1]
    if name != "runtime":
        problems.append("the last (default) stage must be the runtime")
    users = [i.split()[1] for i in final if i.upper().startswith("USER ")]
    if not users or not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]):
        problems.append("the runtime must end as a numeric non-root USER")
    health = [i for i in final if i.upper().startswith("HEALTHCHECK")]
    if len(health) != 1 or "bff.healthcheck" not in health[0]:
        problems.append("the runtime needs HEALTHCHECK python -m bff.healthcheck")
    for stage, instructions in stages:
        for i in instructions:
            if i.upper().startswith(("COPY", "ADD")) and re.search(r"(^|[\s/])static\b", i):
                problems.append(f"{stage}: copies the demo SPA: {i}")
            if "pip install" in i and " -r " in i and "--require-hashes" not in i:
                problems.append(f"{stage}: pip install from a file without --require-hashes")
    copies = [i for i in final if i.upper().startswith("COPY")]
    if any("--from=" not in c for c in copies):
        problems.append("the runtime copies from the build context: only --from=build")
    return problems


def test_the_dockerfile_is_multi_stage_non_root_with_a_healthcheck_and_no_spa() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_the_dockerfile_checker_notices_a_broken_file() -> None:
    text = DOCKERFILE.read_text()
    assert len(dockerfile_problems(text + "COPY static /srv/app/static\n")) == 2
    assert dockerfile_problems(text.replace("USER 10001:10001", "USER root")) != []
    assert dockerfile_problems(re.sub(r"(?m)^HEALTHCHECK.*\n.*\n", "", text)) != []
    assert dockerfile_problems(text.replace("--require-hashes ", "")) != []


def test_the_dockerfile_copies_only_what_exists_and_installs_from_the_lock() -> None:
    stages = dict(dockerfile_stages(DOCKERFILE.read_text()))
    for instructions in stages.values():
        for i in instructions:
            if i.upper().startswith("COPY") and "--from=" not in i:
                for source in i.split()[1:-1]:
                    assert (ROOT / source).exists(), i
    assert any("-r /tmp/requirements.lock" in i for i in stages["build"])
    assert "COPY deploy/requirements.lock /tmp/requirements.lock" in stages["build"]
    pod = by_kind()["Deployment"]["spec"]["template"]["spec"]
    user = next(i.split()[1] for i in stages["runtime"] if i.startswith("USER "))
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_spa() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list: nothing enters the context unless named"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    sources = {
        source
        for instructions in dict(dockerfile_stages(DOCKERFILE.read_text())).values()
        for i in instructions
        if i.upper().startswith("COPY") and "--from=" not in i
        for source in i.split()[1:-1]
    }
    assert {s.rstrip("/").removeprefix("./") for s in sources} == allowed
    assert "static" not in allowed


def locked(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a pip-compile --generate-hashes file."""
    pins: dict[str, tuple[str, int]] = {}
    current = ""
    for line in path.read_text().splitlines():
        if m := re.match(r"([A-Za-z0-9._-]+)==([^\s;\\]+)", line):
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
        elif line.strip() and not line.startswith((" ", "#")):
            pytest.fail(f"{rel(path)}: unexpected line {line!r}")
    return pins


@pytest.mark.parametrize("path", [LOCK, DEPLOY / "requirements-demo.lock"], ids=rel)
def test_the_lock_files_pin_every_package_with_hashes(path: Path) -> None:
    pins = locked(path)
    assert pins
    assert all(hashes > 0 for _, hashes in pins.values()), "a package without --hash"


def test_the_lock_satisfies_pyproject_and_holds_the_build_backend() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = locked(LOCK)
    wanted = [Requirement(r) for r in project["project"]["dependencies"]]
    wanted += [Requirement(r) for r in project["build-system"]["requires"]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {rel(LOCK)}"
        assert req.specifier.contains(pins[name][0], prereleases=True), (req, pins[name])
    demo = locked(DEPLOY / "requirements-demo.lock")
    shared = set(pins) & set(demo)
    assert all(pins[n][0] == demo[n][0] for n in shared), (
        "the demo lock disagrees with the main one"
    )


# --- deploy/bff.service -----------------------------------------------------------------------


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd allows a key more than once."""
    entries: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"bff.service: not key=value: {line!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def service_keys() -> dict[str, str]:
    return {k: v for s, k, v in unit_entries(UNIT.read_text()) if s == "Service"}


def test_the_unit_runs_the_installed_bff_on_the_installed_config() -> None:
    svc = service_keys()
    readme = (ROOT / "README.md").read_text()
    binary, *args = svc["ExecStart"].split()
    venv = binary.removesuffix("/bin/bff")
    assert venv != binary and f"-m venv {venv}" in readme, "README's install creates that venv"
    assert args == ["run", "--config", "/etc/bff/bff.yaml"]
    assert "/etc/bff/bff.yaml" in readme and svc["EnvironmentFile"] in readme
    assert svc["ExecStartPre"].startswith(f"{binary} check-config --offline /etc/bff/bff.yaml")
    assert svc["User"] == "bff" and "useradd --system" in readme


def test_the_unit_stops_after_drain_and_grace_and_reloads_with_sighup() -> None:
    svc = service_keys()
    assert svc["KillMode"] == "mixed", "SIGTERM to the parent, which tells its workers"
    timeout = int(svc["TimeoutStopSec"].removesuffix("s"))
    # The unit runs /etc/bff/bff.yaml, which the README makes from bff.example.yaml.
    stop = stop_seconds(load_one(DEPLOY / "bff.example.yaml"))
    assert stop < timeout <= stop + 15, "SIGKILL only after drain + grace, with a small margin"
    # bff run's parent reloads on SIGHUP (bff/supervisor.py; tests/integration/test_lifecycle.py).
    assert "signal.SIGHUP, self._request_reload" in (ROOT / "bff" / "supervisor.py").read_text()
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_the_unit_is_hardened() -> None:
    svc = service_keys()
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallArchitectures": "native",
        "MemoryDenyWriteExecute": "yes",
    }.items():
        assert svc.get(key) == value, key


def run_systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
def test_systemd_analyze_verify_finds_nothing_but_the_uninstalled_binary() -> None:
    result = run_systemd_analyze("verify", str(UNIT))
    lines = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "/opt/bff/venv/bin/bff is not executable" not in line
    ]
    assert lines == []


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    result = run_systemd_analyze("security", "--offline=true", "--threshold=20", str(UNIT))
    score = re.search(r"Overall exposure level for bff\.service: ([\d.]+) (\w+)", result.stdout)
    assert result.returncode == 0 and score is not None, result.stdout + result.stderr
    assert float(score.group(1)) <= 2.0 and score.group(2) == "OK", score.group(0)
    weak = tmp_path / "bff.service"
    weak.write_text(
        "\n".join(line for line in UNIT.read_text().splitlines() if not line[:1].isupper())
        .replace("[Service]", "[Service]\nExecStart=/bin/true")
        .replace("[Unit]", "[Unit]\nDescription=weak")
    )
    assert run_systemd_analyze("security", "--offline=true", "--threshold=20", str(weak)).returncode


# --- deploy/edge: edge mode on Kubernetes (ingress-nginx, Traefik) ------------------------------
# The nginx and Caddy configs run for real in tests/integration/test_edge.py; these two cannot
# (no cluster in CI), so their structure and their agreement with the Kubernetes base are checked.

EDGE = DEPLOY / "edge"
_NGINX = "nginx.ingress.kubernetes.io/"


def _authz_url() -> str:
    """Where an in-cluster edge reaches bff's auth endpoint: the base's Service, its port."""
    service = by_kind()["Service"]
    (port,) = service["spec"]["ports"]
    suffix = "" if port["port"] == 80 else f":{port['port']}"
    return f"http://{service['metadata']['name']}.default.svc.cluster.local{suffix}/bff/authz"


def _upstream(config: Mapping[str, Any], prefix: str) -> dict[str, Any] | None:
    return next((u for u in config["upstreams"] if u["path"] == prefix), None)


def _mirrors(config: Mapping[str, Any], prefix: str, service: str, port: int) -> list[str]:
    """Problems unless ``prefix`` is a bff route whose upstream is ``service:port``."""
    upstream = _upstream(config, prefix)
    if upstream is None:
        return [f"{prefix} is no route in bff's upstreams:"]
    url = urlsplit(upstream["url"])
    if (url.hostname, url.port) != (service, port):
        return [f"{prefix} goes to {service}:{port}, bff's route to {url.netloc}"]
    return []


def ingress_nginx_problems(docs: list[dict[str, Any]], config: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    hosts = {rule["host"] for doc in docs for rule in doc["spec"]["rules"]}
    if len(hosts) != 1:
        problems.append("the Ingresses must serve one host")
    api = [d for d in docs if _NGINX + "auth-url" in d["metadata"].get("annotations", {})]
    if not api:
        problems.append("no Ingress asks bff (auth-url)")
    closed = False
    for doc in docs:
        annotations = doc["metadata"].get("annotations", {})
        snippet = annotations.get(_NGINX + "configuration-snippet", "")
        paths = [p for rule in doc["spec"]["rules"] for p in rule["http"]["paths"]]
        if doc in api:
            if annotations[_NGINX + "auth-url"] != _authz_url():
                problems.append("auth-url is not the bff Service's /bff/authz")
            headers = annotations.get(_NGINX + "auth-response-headers", "").split(",")
            if "Authorization" not in [h.strip() for h in headers]:
                problems.append("auth-response-headers must copy Authorization")
            if 'proxy_set_header Cookie "";' not in snippet:
                problems.append("the API Ingress must clear the Cookie header")
            for path in paths:
                prefix = re.split(r"[(\[]", path["path"], maxsplit=1)[0]
                backend = path["backend"]["service"]
                problems += _mirrors(config, prefix, backend["name"], backend["port"]["number"])
                upstream = _upstream(config, prefix) or {"url": "http://x"}
                target = annotations.get(_NGINX + "rewrite-target", "")
                if not target.startswith(urlsplit(upstream["url"]).path + "/"):
                    problems.append(f"{prefix}: rewrite-target does not map it as bff does")
        elif any(p["path"] == "/bff/authz" and p["pathType"] == "Exact" for p in paths):
            closed = "return 404;" in snippet
    if not closed:
        problems.append("/bff/authz must answer the browser 404")
    return problems


def test_the_ingress_nginx_edge_matches_the_kubernetes_schema() -> None:
    for doc in load_all(EDGE / "ingress-nginx.yaml"):
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_ingress_nginx_edge_asks_bff_and_mirrors_its_routes(k8s_config: dict[str, Any]) -> None:
    docs = load_all(EDGE / "ingress-nginx.yaml")
    assert ingress_nginx_problems(docs, k8s_config) == []


def test_the_ingress_nginx_checker_notices_broken_files(k8s_config: dict[str, Any]) -> None:
    docs = load_all(EDGE / "ingress-nginx.yaml")
    broken = copy.deepcopy(docs)
    for doc in broken:
        doc["metadata"].get("annotations", {}).pop(_NGINX + "configuration-snippet", None)
    found = ingress_nginx_problems(broken, k8s_config)
    assert "the API Ingress must clear the Cookie header" in found
    assert "/bff/authz must answer the browser 404" in found
    moved = copy.deepcopy(docs)
    moved[0]["spec"]["rules"][0]["http"]["paths"][0]["path"] = "/api/other(/|$)(.*)"
    assert "/api/other is no route in bff's upstreams:" in ingress_nginx_problems(moved, k8s_config)


def traefik_problems(docs: list[dict[str, Any]], config: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    if any(d["apiVersion"] != "traefik.io/v1alpha1" for d in docs):
        problems.append("Traefik v3 resources are traefik.io/v1alpha1")
    middlewares = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Middleware"}
    auth = [n for n, m in middlewares.items() if "forwardAuth" in m]
    strip = [
        n for n, m in middlewares.items() if m.get("headers", {}).get("customRequestHeaders", {})
        == {"Cookie": ""}
    ]  # fmt: skip
    for name in auth:
        forward = middlewares[name]["forwardAuth"]
        if forward.get("address") != _authz_url():
            problems.append("forwardAuth.address is not the bff Service's /bff/authz")
        if forward.get("authResponseHeaders") != ["Authorization", "DPoP"]:
            problems.append("forwardAuth must copy Authorization and DPoP (and only them)")
        if forward.get("trustForwardHeader") is not False:
            problems.append("forwardAuth must not trust the browser's X-Forwarded-*")
    (route_doc,) = [d for d in docs if d["kind"] == "IngressRoute"]
    closed = asked = False
    for route in route_doc["spec"]["routes"]:
        names = [m["name"] for m in route.get("middlewares", [])]
        prefix = re.search(r"PathPrefix\(`([^`]+)`\)", route["match"])
        if prefix is not None:
            asked = True
            if not names or names[0] not in auth:
                problems.append(f"{prefix.group(1)}: bff's forwardAuth must come first")
            at = next((i for i, n in enumerate(names) if n in auth), len(names))
            if not any(n in strip for n in names[at + 1 :]):
                problems.append(f"{prefix.group(1)}: the Cookie header must go after forwardAuth")
            (service,) = route["services"]
            problems += _mirrors(config, prefix.group(1), service["name"], service["port"])
        if "Path(`/bff/authz`)" in route["match"]:
            closed = any(
                middlewares.get(n, {}).get("replacePath", {}).get("path", "/bff/authz")
                != "/bff/authz"
                for n in names
            )
    if not asked:
        problems.append("no route asks bff")
    if not closed:
        problems.append("/bff/authz must not reach bff from the browser")
    return problems


def test_the_traefik_edge_asks_bff_and_mirrors_its_routes(k8s_config: dict[str, Any]) -> None:
    assert traefik_problems(load_all(EDGE / "traefik.yaml"), k8s_config) == []


def test_the_traefik_checker_notices_broken_files(k8s_config: dict[str, Any]) -> None:
    docs = load_all(EDGE / "traefik.yaml")
    swapped = copy.deepcopy(docs)
    route = next(d for d in swapped if d["kind"] == "IngressRoute")["spec"]["routes"][0]
    route["middlewares"].reverse()
    found = traefik_problems(swapped, k8s_config)
    assert "/api/orders: bff's forwardAuth must come first" in found
    assert "/api/orders: the Cookie header must go after forwardAuth" in found
    trusting = copy.deepcopy(docs)
    trusting[0]["spec"]["forwardAuth"]["trustForwardHeader"] = True
    del trusting[0]["spec"]["forwardAuth"]["authResponseHeaders"]
    found = traefik_problems(trusting, k8s_config)
    assert "forwardAuth must not trust the browser's X-Forwarded-*" in found
    assert "forwardAuth must copy Authorization and DPoP (and only them)" in found
    opened = [d for d in docs if d["metadata"]["name"] != "bff-authz-closed"]
    assert "/bff/authz must not reach bff from the browser" in traefik_problems(opened, k8s_config)
