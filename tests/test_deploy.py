"""Static checks of the deployment files (no Docker engine or cluster here): they parse, and every path, port,
env var and probe they name exists in the repository and in service.settings.Settings."""

from __future__ import annotations

import ast
import asyncio
import fnmatch
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml  # pyyaml, from the test extra
from conftest import Server, start_server, stop_server
from pydantic import TypeAdapter

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# Settings fields the deployment files may name before the settings define them.
PREFIX = "PRUNECASCADE_"
DEFAULT_PORT = Settings.model_fields["port"].default
KNOWN_COMMANDS = {"serve", "bootstrap"}  # the contract's commands the deployment runs


def _known_env(name: str) -> bool:
    if not name.startswith(PREFIX):
        return False
    field = name.removeprefix(PREFIX)
    return field.lower() in Settings.model_fields


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            instr, _, args = ln.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def _dockerignore() -> list[str]:
    path = ROOT / ".dockerignore"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p.removeprefix("**/")) or rel.split("/")[0] == p for p in patterns)


def _dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in _dockerfile():
        if instr == "ENV":
            env.update(dict(pair.split("=", 1) for pair in args.split()))
    return env


def test_dockerfile_copies_paths_that_exist_and_are_not_dockerignored() -> None:
    patterns = _dockerignore()
    copies = [args for instr, args in _dockerfile() if instr in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        if args.startswith("--from="):  # from an earlier build stage, not from the build context
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert not src.startswith("--"), f"unexpected COPY flag in {args!r}"
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    package_dirs = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    )
    copied = {s.split()[0] for s in copies if not s.startswith("--from=")}
    for pattern in package_dirs:
        assert pattern.rstrip("*") in copied, f"package {pattern} is installed from pyproject but not copied"


def test_dockerfile_installs_pinned_cpu_torch_before_the_project() -> None:
    runs = [args for instr, args in _dockerfile() if instr == "RUN"]
    torch_i = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_i = next(i for i, r in enumerate(runs) if re.search(r"pip install [^&;]*\s\.(\s|$)", r))
    assert torch_i < project_i
    # offline from deploy/wheels when it holds wheels, else the CPU index (never PyPI's CUDA build)
    assert "--no-index --find-links /tmp/wheels" in runs[torch_i]
    assert "--index-url https://download.pytorch.org/whl/cpu" in runs[torch_i]
    pinned = next(
        d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("torch")
    )
    assert pinned.replace(" ", "") in runs[torch_i].split()


def test_dockerfile_runs_as_non_root_with_a_probe_healthcheck() -> None:
    instrs = _dockerfile()
    users = [args for instr, args in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [args for instr, args in instrs if instr == "HEALTHCHECK"]
    assert "/readyz" in health or "/healthz" in health
    assert "PRUNECASCADE_PORT" in health


def test_dockerfile_env_and_port_match_settings() -> None:
    env = _dockerfile_env()
    assert all(_known_env(k) for k in env if k.startswith(PREFIX)), env
    assert env["PRUNECASCADE_HOST"] == "0.0.0.0"  # the 127.0.0.1 default is unreachable from outside a container
    (expose,) = [args for instr, args in _dockerfile() if instr == "EXPOSE"]
    assert int(expose) == int(env.get("PRUNECASCADE_PORT", DEFAULT_PORT)) == DEFAULT_PORT
    cmd = next(args for instr, args in _dockerfile() if instr == "CMD")
    assert ast.literal_eval(cmd)[:2] == ["prunecascade", "serve"]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _api_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("command", [])[:2] == ["prunecascade", "serve"]}


def test_compose_runs_two_replicas_sharing_the_registry_volume(compose: dict[str, Any]) -> None:
    apis = _api_services(compose)
    assert len(apis) >= 2
    mounts = {tuple(s["volumes"]) for s in apis.values()}
    assert len(mounts) == 1, "replicas must mount the same volumes"
    (volume, target) = next(iter(mounts))[0].split(":")[:2]
    assert volume in compose["volumes"], "the registry must be a named volume"
    for s in apis.values():
        assert s["environment"]["PRUNECASCADE_HOME"] == target
    boot = compose["services"]["bootstrap"]
    assert boot["command"][:2] == ["prunecascade", "bootstrap"]
    assert f"{volume}:{target}" in boot["volumes"] and boot["environment"]["PRUNECASCADE_HOME"] == target
    for s in apis.values():
        assert s["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"


def test_compose_env_vars_build_paths_and_secret_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for key in svc.get("environment", {}):
            assert _known_env(key), f"{name}: {key} is not a Settings field"
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: bind mount {src} does not exist"
        for cmd in [svc.get("command", [])]:
            if cmd[:1] == ["prunecascade"]:
                assert cmd[1] in KNOWN_COMMANDS
    for svc in _api_services(compose).values():
        (secret,) = svc["secrets"]
        assert secret in compose["secrets"]
        assert svc["environment"]["PRUNECASCADE_ADMIN_TOKEN_FILE"] == f"/run/secrets/{secret}"
        host, port = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", svc["environment"]["PRUNECASCADE_REDIS_URL"]).groups()
        assert host in compose["services"] and port == "6379"
        assert int(svc["environment"]["PRUNECASCADE_PORT"]) == DEFAULT_PORT
        assert svc["expose"] == [str(DEFAULT_PORT)]


def test_nginx_balances_over_the_compose_replicas(compose: dict[str, Any]) -> None:
    lb = compose["services"]["lb"]
    conf_src, conf_dest = lb["volumes"][0].split(":")[:2]
    assert conf_dest == "/etc/nginx/nginx.conf"
    conf = (ROOT / conf_src).read_text()
    servers = re.findall(r"^\s*server\s+([\w-]+):(\d+)", conf, flags=re.M)
    apis = _api_services(compose)
    assert {h for h, _ in servers} == set(apis)
    for host, port in servers:
        assert int(port) == int(apis[host]["environment"]["PRUNECASCADE_PORT"])
    assert conf.count("{") == conf.count("}")
    assert all(p.startswith("127.0.0.1:") for p in lb["ports"]), "publish the load balancer on loopback only"


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_every_manifest(manifests: list[dict[str, Any]]) -> None:
    """kubectl's own kustomize (offline: no cluster needed) accepts the kustomization and renders exactly the
    objects the manifests define, with the common labels it adds."""
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rendered = [d for d in yaml.safe_load_all(done.stdout) if d]
    objects = [d for d in manifests if d["kind"] != "Kustomization"]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in objects
    )
    (pairs,) = [entry["pairs"] for entry in yaml.safe_load((K8S / "kustomization.yaml").read_text())["labels"]]
    for doc in rendered:
        assert pairs.items() <= doc["metadata"].get("labels", {}).items()


def test_deployment_probes_ports_and_env(manifests: list[dict[str, Any]]) -> None:
    dep = _one(manifests, "Deployment", "prunecascade")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert all(_known_env(k) for k in env), env
    assert c["command"][:2] == ["prunecascade", "serve"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(env.get("PRUNECASCADE_PORT", DEFAULT_PORT)) == DEFAULT_PORT
    assert env["PRUNECASCADE_HOST"] == "0.0.0.0"
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) <= set(volumes)
    claim = volumes["registry"]["persistentVolumeClaim"]["claimName"]
    assert _one(manifests, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    assert mounts["registry"] == env["PRUNECASCADE_HOME"]
    token_dir, token_file = env["PRUNECASCADE_ADMIN_TOKEN_FILE"].rsplit("/", 1)
    assert mounts["admin-token"] == token_dir
    assert [i["path"] for i in volumes["admin-token"]["secret"]["items"]] == [token_file]
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_every_deployment_trains_the_reader_in_the_background_as_make_run_does(
    compose: dict[str, Any], manifests: list[dict[str, Any]]
) -> None:
    """The reader is what beats FAISS alone; a replica that never trains one serves FAISS alone for good. The image,
    the compose replicas and the pods switch it on, as `make run` does, and the check's overlay alone off."""
    as_bool = TypeAdapter(bool).validate_python
    assert as_bool(_dockerfile_env()["PRUNECASCADE_TRAIN_READER"])
    apis = _api_services(compose)
    assert apis and all(as_bool(s["environment"]["PRUNECASCADE_TRAIN_READER"]) for s in apis.values())
    (c,) = _one(manifests, "Deployment", "prunecascade")["spec"]["template"]["spec"]["containers"]
    assert as_bool({e["name"]: e["value"] for e in c["env"]}["PRUNECASCADE_TRAIN_READER"])
    assert "--train-reader" in re.search(r"^run:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    overlay = yaml.safe_load((ROOT / "deploy" / "compose-check.override.yml").read_text())["services"]
    assert all(not as_bool(overlay[name]["environment"]["PRUNECASCADE_TRAIN_READER"]) for name in apis)


def test_service_hpa_job_and_redis_point_at_what_exists(manifests: list[dict[str, Any]]) -> None:
    dep = _one(manifests, "Deployment", "prunecascade")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = _one(manifests, "Service", "prunecascade")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names
    hpa = _one(manifests, "HorizontalPodAutoscaler", "prunecascade")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "prunecascade")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    job = _one(manifests, "Job", "prunecascade-bootstrap")["spec"]["template"]["spec"]
    assert job["containers"][0]["command"][:2] == ["prunecascade", "bootstrap"]
    assert job["volumes"][0]["persistentVolumeClaim"]["claimName"] == "prunecascade-registry"
    env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    host, port = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", env["PRUNECASCADE_REDIS_URL"]).groups()
    redis_svc = _one(manifests, "Service", host)
    assert int(port) in {p["port"] for p in redis_svc["spec"]["ports"]}
    redis_pod = _one(manifests, "Deployment", host)["spec"]["template"]
    assert redis_svc["spec"]["selector"].items() <= redis_pod["metadata"]["labels"].items()


def test_locustfile_queries_the_contract_endpoint() -> None:
    source = (ROOT / "deploy" / "locustfile.py").read_text()
    tree = ast.parse(source)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert any(isinstance(b, ast.Name) and b.id == "HttpUser" for c in classes for b in c.bases)
    assert '"/v1/query"' in source


# -- building without a registry, and deploy/compose-check.sh -----------------------------------------------


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr, args in _dockerfile():
        if instr == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instr, args))
    return stages


def test_dockerfile_base_is_a_build_arg_and_wheels_stay_out_of_the_runtime_image() -> None:
    instrs = _dockerfile()
    assert instrs[0] == ("ARG", "BASE_IMAGE=python:3.11-slim"), "the default base must stay the official image"
    build, runtime = _stages()
    assert build[0] == ("FROM", "${BASE_IMAGE} AS build") and runtime[0] == ("FROM", "${BASE_IMAGE}")
    assert ("COPY", "deploy/wheels /tmp/wheels") in build
    runtime_copies = [args for instr, args in runtime if instr in ("COPY", "ADD")]
    assert runtime_copies == ["--from=build /opt/prunecascade /opt/prunecascade"], "only the venv reaches the image"
    env = _dockerfile_env()
    assert env["PATH"].startswith("/opt/prunecascade/bin:")


def test_wheelhouse_and_secrets_are_never_committed() -> None:
    for folder, kept in (("deploy/wheels", {".gitignore", "README.md"}), ("deploy/secrets", {".gitignore"})):
        lines = (ROOT / folder / ".gitignore").read_text().splitlines()
        assert "*" in lines, f"{folder}: everything ignored"
        assert {ln.removeprefix("!") for ln in lines if ln.startswith("!")} == kept
    assert "deploy/secrets" in _dockerignore(), "the admin token must not reach the build context"
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files", "deploy/wheels", "deploy/secrets"], cwd=ROOT, capture_output=True, text=True
        ).stdout.split()
        assert all(Path(t).name in {".gitignore", "README.md"} for t in tracked), tracked


def test_compose_images_default_to_the_official_ones_and_commands_are_explicit(compose: dict[str, Any]) -> None:
    """The local images of compose-check.sh have no entrypoint scripts: the compose file spells out the commands
    the official images would run, so both kinds behave alike."""
    svcs = compose["services"]
    assert svcs["redis"]["image"] == "${PC_REDIS_IMAGE:-redis:7.4-alpine}"
    assert svcs["lb"]["image"] == "${PC_NGINX_IMAGE:-nginx:1.27-alpine}"
    assert svcs["lb"]["command"] == ["nginx", "-g", "daemon off;"]
    redis_cmd = svcs["redis"]["command"]
    assert redis_cmd[0] == "redis-server" and redis_cmd[redis_cmd.index("--dir") + 1] == "/data"
    for name in ("bootstrap", *_api_services(compose)):
        assert svcs[name]["image"] == "${PC_IMAGE:-prunecascade:latest}"
        assert svcs[name]["build"]["args"]["BASE_IMAGE"] == "${PC_BASE_IMAGE:-python:3.11-slim}"
    assert "name" not in compose, "Debian's docker-compose 1.29 refuses a top-level name"
    (secret,) = compose["secrets"].values()
    assert set(secret) == {"file"}, "docker-compose 1.29 knows file secrets only"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed")
def test_docker_compose_accepts_the_file_and_the_check_overlay() -> None:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PC_ADMIN_TOKEN_FILE": "/nonexistent/token"}
    base = ["-f", "docker-compose.yml"]
    for files in (base, [*base, "-f", "deploy/compose-check.override.yml"]):
        done = subprocess.run(
            ["docker-compose", *files, "config"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
        )
        assert done.returncode == 0, done.stderr
        merged = yaml.safe_load(done.stdout)
        assert set(merged["services"]) == {"redis", "bootstrap", "api-1", "api-2", "lb"}
    boot = merged["services"]["bootstrap"]
    assert boot["command"] == ["python", "/opt/check/tiny_bootstrap.py"]
    assert any(v.endswith("/opt/check/tiny_bootstrap.py:ro") for v in boot["volumes"] if isinstance(v, str)) or any(
        isinstance(v, dict) and v.get("target") == "/opt/check/tiny_bootstrap.py" for v in boot["volumes"]
    )


def _load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_tiny_bootstrap_builds_every_variant_its_stages_name() -> None:
    tiny = _load_module(ROOT / "deploy" / "tiny_bootstrap.py").TINY
    built = {v.name for v in tiny.variants} | {tiny.dense_name}
    assert {s.variant for s in tiny.stages} <= built
    assert tiny.stages[-1].variant == tiny.dense_name


def test_nginx_retries_queries_and_gives_up_on_a_dead_replica_fast() -> None:
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    (connect,) = re.findall(r"proxy_connect_timeout\s+(\d+)s;", conf)
    assert int(connect) <= 2, "a dead replica's address must not hold a query for the 60 s default"
    (query_block,) = re.findall(r"location = /v1/query \{(.*?)\}", conf, flags=re.S)
    retry = re.search(r"proxy_next_upstream ([^;]+);", query_block).group(1).split()
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry)
    keepalive_fields = [f for f in Settings.model_fields if "keep_alive" in f or "keepalive" in f]
    if keepalive_fields:  # a setting for uvicorn's keep-alive, if the service has one
        replica_keepalive = Settings.model_fields[keepalive_fields[0]].default
    else:
        replica_keepalive = uvicorn.Config(app=None).timeout_keep_alive
    (upstream_keepalive,) = re.findall(r"keepalive_timeout\s+(\d+)s;", conf)
    assert int(upstream_keepalive) < replica_keepalive


def test_compose_check_targets_loopback_tears_down_and_is_bounded() -> None:
    script = (ROOT / "deploy" / "compose-check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "deploy" / "compose-check.sh")]).returncode == 0
    assert "LB=http://127.0.0.1:$PC_LB_PORT" in script
    assert re.search(r"trap cleanup EXIT", script) and "down -v --remove-orphans" in script
    assert not re.search(r"\b(pkill|killall)\b", script)
    assert not re.search(r"while true|until ", script), "every wait is a bounded for loop"
    for url in re.findall(r"https?://[^\s\"']+", script):
        assert url.startswith(("http://127.0.0.1", "$LB")), url


def test_compose_load_refuses_non_loopback_and_unbounded_runs() -> None:
    load = _load_module(ROOT / "deploy" / "compose_load.py")
    with pytest.raises(ValueError, match="not loopback"):
        load.main(["--url", "http://192.0.2.10:8080", "--requests", "1"])
    with pytest.raises(SystemExit):
        load.main(["--requests", str(load.MAX_REQUESTS + 1)])
    with pytest.raises(SystemExit):
        load.main(["--timeout", "0"])


def test_compose_load_answers_every_query_of_a_live_server(server: Server) -> None:
    load = _load_module(ROOT / "deploy" / "compose_load.py")
    summary = asyncio.run(load.run_load(server.url, 20, 50.0, 10.0, 3, 10, None, None, seed=7))
    assert (summary.requests, summary.ok, summary.failed, summary.errors) == (20, 20, 0, {})
    assert summary.fault is None and 0 < summary.latency_ms["p50"] <= summary.latency_ms["max"]


def test_compose_load_counts_the_queries_a_killed_server_loses(tiny_home: Path) -> None:
    """The fault command runs mid-load and every query sent after it is counted as failed, with its reason.

    The victim answers one query before the load starts, so the queries sent in the first second are answered
    by a warm server even on a loaded machine, and the kill at 1 s finds both answered and unanswered ones."""
    load = _load_module(ROOT / "deploy" / "compose_load.py")
    victim = start_server(tiny_home)
    try:
        body = {"target": {"label": 0}, "k": 3, "mode": "cascade"}
        warm = httpx.post(f"{victim.url}/v1/query", json=body, timeout=30)
        assert warm.status_code == 200, warm.text
        summary = asyncio.run(
            load.run_load(victim.url, 60, 30.0, 5.0, 3, 10, 1.0, f"kill -KILL {victim.process.pid}", seed=11)
        )
    finally:
        stop_server(victim)
    assert summary.fault["rc"] == 0 and summary.fault["at_s"] >= 1.0
    assert summary.ok > 0 and summary.failed > 0 and summary.ok + summary.failed == 60
    assert sum(summary.errors.values()) == summary.failed
    assert all(reason in {"ConnectError", "ReadError", "RemoteProtocolError"} for reason in summary.errors)
    late = [o for o in range(60) if o / 30.0 >= summary.fault["at_s"] + 0.2]
    assert len(summary.failed_at_s) >= len(late)
