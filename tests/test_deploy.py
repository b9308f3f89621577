"""Static checks of the deployment files (no Docker engine or cluster here): they parse, and every path, port,
env var and probe they name exists in the repository and in service.settings.Settings."""

from __future__ import annotations

import ast
import fnmatch
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml  # pyyaml, from the test extra

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# Settings fields that issue 5 adds; until then they may be named by the deployment files.
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
        *sources, _dest = args.split()
        for src in sources:
            assert not src.startswith("--"), f"unexpected COPY flag in {args!r}"
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    package_dirs = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    )
    copied = {s.split()[0] for s in copies}
    for pattern in package_dirs:
        assert pattern.rstrip("*") in copied, f"package {pattern} is installed from pyproject but not copied"


def test_dockerfile_installs_pinned_cpu_torch_before_the_project() -> None:
    runs = [args for instr, args in _dockerfile() if instr == "RUN"]
    torch_i = next(i for i, r in enumerate(runs) if "torch==" in r)
    project_i = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_i < project_i
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
