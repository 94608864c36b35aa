"""deploy/ checked without a cluster, a Docker daemon or a network.

- Kubernetes: each overlay (and the optional Postgres component) is built by the real kustomize,
  `kubectl kustomize` (kubectl is on the machine image; `kustomize build` works too). Every resource is
  validated against the Kubernetes OpenAPI schemas shipped by the `kubernetes-validate` package (strict:
  unknown fields fail), then against our own rules: probes on declared ports, references to ConfigMaps,
  Secrets and PVCs that exist, `LORA_GATEWAY_*` env names that are real settings, the gateway's config
  file loading into `Settings`, and the gateway and vLLM agreeing on the model, the LoRA limits, the
  engine address and the adapter store path.
- Compose: validated against the Compose Specification's JSON schema (shipped by `check-jsonschema`),
  then the same agreement checks, plus every bind-mounted file and the build context existing.
- Prometheus and Grafana: the configs parse; every metric the dashboard queries is one that
  `gateway.metrics.Metrics` exposes (with the labels it groups by) or a known vLLM metric.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel, SecretStr

from gateway.metrics import Metrics
from gateway.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose" / "docker-compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "lora-gateway-dashboard.json"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests target
# Created by the operator, never committed (docs/deploy.md); optional ones are marked optional: true.
OPERATOR_SECRETS = {
    "lora-gateway-admin",
    "lora-gateway-api-keys",
    "lora-gateway-engine-key",
    "lora-gateway-hf",
    "lora-gateway-postgres",
}
SECRET_SAMPLES = {"LORA_GATEWAY_AUTH__API_KEYS": '[{"key": "sk-test", "models": ["*"]}]'}
VLLM_METRICS = {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}
VLLM_LABELS = {"model_name", "engine"}
BUILDS = ("dev", "prod", "prod+postgres")
NAMESPACED = {
    "ConfigMap",
    "Secret",
    "Service",
    "Deployment",
    "StatefulSet",
    "PersistentVolumeClaim",
    "NetworkPolicy",
}


# --- building -------------------------------------------------------------------------------------------


def kustomize(path: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    else:
        message = "needs `kubectl` (kubectl kustomize) or `kustomize` on PATH"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    # The Postgres component is optional (prod leaves it out for now): build prod with it from a temporary
    # overlay. kustomize accepts only relative paths, which may leave the overlay's folder.
    extra = tmp_path_factory.mktemp("prod-postgres")
    rel = Path(os.path.relpath(K8S, extra))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(rel / "overlays" / "prod")],
        "components": [str(rel / "components" / "postgres")],
        "namespace": "lora-gateway",
    }
    (extra / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return {
        "dev": kustomize(K8S / "overlays" / "dev"),
        "prod": kustomize(K8S / "overlays" / "prod"),
        "prod+postgres": kustomize(extra),
    }


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The resource `kind`/`name`; a generated ConfigMap or Secret also matches its hashed name."""
    for doc in docs:
        actual = doc["metadata"]["name"]
        if doc["kind"] == kind and (
            actual == name or re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", actual)
        ):
            return doc
    raise AssertionError(f"no {kind} {name}")


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def resolve_env(c: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment as Kubernetes would give it (Secrets: sample values)."""
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif ref := var["valueFrom"].get("configMapKeyRef"):
            env[var["name"]] = find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif ref := var["valueFrom"].get("secretKeyRef"):
            env[var["name"]] = SECRET_SAMPLES.get(var["name"], "test-secret")
    return env


# --- the gateway's settings -----------------------------------------------------------------------------


def setting_path(env_name: str) -> tuple[str, ...]:
    """The settings field an env var sets; fails for a name `Settings` would silently ignore."""
    parts = tuple(env_name.removeprefix(ENV_PREFIX).lower().split("__"))
    model: type[BaseModel] | None = Settings
    for i, part in enumerate(parts):
        assert model is not None and part in model.model_fields, (
            f"{env_name}: no setting {'.'.join(parts[: i + 1])}"
        )
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return parts


def load_gateway_settings(
    config_text: str, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    ours = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    for key, value in ours.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text)
    settings = Settings(config_file=path)
    for key, raw in ours.items():  # each env var took effect where we think it does
        value: Any = settings
        for part in setting_path(key):
            value = getattr(value, part)
        if isinstance(value, SecretStr):
            assert value.get_secret_value() == raw, key
        elif isinstance(value, int | float):
            assert value == float(raw), key
        elif isinstance(value, str | Path):
            assert str(value) == raw, key
        else:
            assert value, key
    return settings


def parse_flags(args: list[str]) -> dict[str, str | None]:
    flags: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"unexpected argument {arg!r} in {args}"
        if "=" in arg:
            key, value = arg.split("=", 1)
            flags[key], i = value, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            flags[arg], i = args[i + 1], i + 2
        else:
            flags[arg], i = None, i + 1
    return flags


def assert_engine_agrees(
    settings: Settings, vllm_argv: list[str], vllm_env: dict[str, str], host: str
) -> None:
    """vLLM runs with the flags and environment the gateway's settings assume, where the gateway looks."""
    assert vllm_argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    flags = parse_flags(vllm_argv[3:])
    e = settings.engine
    assert "--enable-lora" in flags
    assert vllm_env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("true", "1")
    assert e.mode == "attached" and e.url and e.model and e.served_model_name
    for flag, setting in (
        ("--model", e.model),
        ("--served-model-name", e.served_model_name),
        ("--max-loras", e.max_loras),
        ("--max-lora-rank", e.max_lora_rank),
        ("--max-cpu-loras", e.max_cpu_loras),
    ):
        assert flags[flag] == str(setting), f"vLLM {flag} {flags[flag]} but the gateway has {setting}"
    # vLLM keeps max_cpu_loras in memory; the gateway registers at least that many (it would waste them)
    assert e.max_loras <= e.max_cpu_loras <= settings.max_resident()
    url = urlsplit(e.url)
    assert (url.hostname, url.port) == (host, int(flags["--port"] or 0))
    assert flags["--host"] == "0.0.0.0"
    assert settings.host == "0.0.0.0", "the gateway must listen beyond loopback in a container"


def dockerfile_argv() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return entry + cmd


def dockerfile_user() -> str:
    users = re.findall(r"^USER (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert users, "the image must not run as root"
    return users[-1].split(":")[0]


def config_arg(argv: list[str]) -> str:
    assert argv[:2] == ["lora-gateway", "serve"] and "--config" in argv, argv
    return argv[argv.index("--config") + 1]


# --- Kubernetes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_schema(builds: dict[str, list[dict[str, Any]]], build: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in builds[build]:
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            raise AssertionError(
                f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}"
            ) from None


@pytest.mark.parametrize("build", BUILDS)
def test_references_and_ports(builds: dict[str, list[dict[str, Any]]], build: str) -> None:
    docs = builds[build]
    namespace = "lora-gateway-dev" if build == "dev" else "lora-gateway"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert len(names) == len(docs), "duplicate resources"
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        if doc["kind"] in NAMESPACED:
            assert doc["metadata"].get("namespace") == namespace, doc["metadata"]["name"]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for w in workloads:
        spec, pod = w["spec"], w["spec"]["template"]["spec"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), w["metadata"]["name"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        volumes |= {t["metadata"]["name"]: t for t in spec.get("volumeClaimTemplates", [])}
        for v in pod.get("volumes", []):
            if "persistentVolumeClaim" in v:
                find(docs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
            if "configMap" in v:
                find(docs, "ConfigMap", v["configMap"]["name"])
        for c in pod["containers"]:
            where = f"{w['metadata']['name']}/{c['name']}"
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: pin {image}"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(kind, {})
                for handler in ("httpGet", "tcpSocket"):
                    if handler in probe:
                        port = probe[handler]["port"]
                        assert port in ports or port in ports.values(), f"{where} {kind}: port {port}"
            assert "readinessProbe" in c and "livenessProbe" in c, where
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}: no volume {m['name']}"
            for var in c.get("env", []):
                ref = var.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    cm = find(docs, "ConfigMap", ref["configMapKeyRef"]["name"])
                    assert ref["configMapKeyRef"]["key"] in cm["data"], f"{where}: {var['name']}"
                if "secretKeyRef" in ref:
                    secret = ref["secretKeyRef"]
                    if ("Secret", secret["name"]) not in names and not secret.get("optional"):
                        assert secret["name"] in OPERATOR_SECRETS, f"{where}: Secret {secret['name']}"
                if var["name"].startswith(ENV_PREFIX):
                    setting_path(var["name"])
            limits = c.get("resources", {}).get("limits", {})
            if "nvidia.com/gpu" in limits:
                assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"] == 1
    for svc in (d for d in docs if d["kind"] == "Service"):
        selected = [
            w
            for w in workloads
            if svc["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
        declared = {
            p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in declared, f"Service {svc['metadata']['name']}: {port['targetPort']}"


@pytest.mark.parametrize("build", BUILDS)
def test_gateway_and_vllm_agree(
    builds: dict[str, list[dict[str, Any]]], build: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = builds[build]
    deployment = find(docs, "Deployment", "lora-gateway")
    gw = container(deployment, "gateway")
    pod = deployment["spec"]["template"]["spec"]
    # The config file the gateway is started with is the ConfigMap mounted there, and it loads.
    assert "command" not in gw, "the image's ENTRYPOINT (lora-gateway) runs"
    config = config_arg(dockerfile_argv()[:1] + gw["args"])
    mount = next(m for m in gw["volumeMounts"] if m["mountPath"] == str(Path(config).parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_text = find(docs, "ConfigMap", volume["configMap"]["name"])["data"][Path(config).name]
    settings = load_gateway_settings(config_text, resolve_env(gw, docs), tmp_path, monkeypatch)
    assert settings.auth.admin_token is not None
    assert settings.port == next(p["containerPort"] for p in gw["ports"] if p["name"] == "http")
    if build.startswith("prod"):
        assert settings.auth.api_keys, "production requires inference API keys"
    # Readiness follows the engine; liveness must not, or a loading vLLM would get the gateway killed.
    assert gw["readinessProbe"]["httpGet"]["path"] == "/health"
    assert gw["livenessProbe"].get("httpGet", {}).get("path") != "/health"
    assert pod["terminationGracePeriodSeconds"] > settings.engine.stop_timeout_s
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user()
    # One gateway: its registry is SQLite and it decides what each vLLM holds (docs/deploy.md, "Scaling").
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"

    sts = find(docs, "StatefulSet", "vllm")
    vllm = container(sts, "vllm")
    vllm_env = resolve_env(vllm, docs)
    argv = [re.sub(r"\$\((\w+)\)", lambda m: vllm_env[m.group(1)], a) for a in vllm["command"] + vllm["args"]]
    service = find(docs, "Service", sts["spec"]["serviceName"])
    # Every vLLM pod is a replica: the name resolves to each pod's address (headless), and the gateway
    # re-resolves it. A ClusterIP would hide the replicas behind one address.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert settings.engine.resolve_dns and not settings.engine.urls
    assert_engine_agrees(settings, argv, vllm_env, host=service["metadata"]["name"])
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    # vLLM requires a key on /v1 (adapter loads included) and the gateway sends it: one Secret for both,
    # in vLLM's environment (VLLM_API_KEY), not on its command line.
    assert settings.engine.api_key is not None
    assert secret_ref(gw, "LORA_GATEWAY_ENGINE__API_KEY") == secret_ref(vllm, "VLLM_API_KEY")
    assert "--api-key" not in argv

    # The adapter store: one ReadWriteMany claim, at <data_dir>/adapters in both pods.
    store = str(settings.data_dir / "adapters")
    claim = claim_at(deployment, gw, store)
    assert claim == claim_at(sts, vllm, store)
    assert "ReadWriteMany" in find(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"]


def secret_ref(c: dict[str, Any], name: str) -> tuple[str, str]:
    """(Secret, key) that container `c`'s env var `name` comes from; it must be required."""
    var = next((v for v in c.get("env", []) if v["name"] == name), None)
    assert var is not None, f"{c['name']}: no env {name}"
    ref = var.get("valueFrom", {}).get("secretKeyRef")
    assert ref and not ref.get("optional"), f"{c['name']}: {name} must come from a required Secret"
    return ref["name"], ref["key"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"unchecked selector {selector}"
    return bool(selector.get("matchLabels")) and selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("build", BUILDS)
def test_only_gateways_reach_vllm(builds: dict[str, list[dict[str, Any]]], build: str) -> None:
    """vLLM's port loads adapters: a NetworkPolicy admits the gateway's pods to it, and nothing else."""
    docs = builds[build]
    vllm_pod = find(docs, "StatefulSet", "vllm")["spec"]["template"]
    gateway_pod = find(docs, "Deployment", "lora-gateway")["spec"]["template"]
    vllm_labels, gateway_labels = vllm_pod["metadata"]["labels"], gateway_pod["metadata"]["labels"]
    policies = [
        d for d in docs if d["kind"] == "NetworkPolicy" and selects(d["spec"]["podSelector"], vllm_labels)
    ]
    assert policies, "no NetworkPolicy selects the vLLM pods: anything in the cluster can call them"
    ports = {
        p["name"]: p["containerPort"] for p in container({"spec": {"template": vllm_pod}}, "vllm")["ports"]
    }
    for policy in policies:  # policies add up: every one that selects vLLM must admit only gateways
        spec = policy["spec"]
        assert "Ingress" in spec["policyTypes"]
        for rule in spec.get("ingress", []):
            assert rule.get("from"), "an ingress rule without `from` admits every peer"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"only pods of this namespace, not {peer}"
                assert selects(peer["podSelector"], gateway_labels), peer
                assert not selects(peer["podSelector"], vllm_labels), peer
            assert rule.get("ports") and {p["port"] for p in rule["ports"]} <= set(ports) | set(
                ports.values()
            )


def claim_at(workload: dict[str, Any], c: dict[str, Any], path: str) -> str:
    """The PersistentVolumeClaim container `c` of `workload` has mounted at `path`."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    mount = next((m for m in c["volumeMounts"] if m["mountPath"] == path), None)
    assert mount, f"{workload['metadata']['name']}/{c['name']} mounts nothing at {path}"
    return volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]


def test_postgres_component(builds: dict[str, list[dict[str, Any]]]) -> None:
    docs = builds["prod+postgres"]
    sts = find(docs, "StatefulSet", "postgres")
    service = find(docs, "Service", "postgres")
    assert service["spec"]["ports"][0]["port"] == container(sts, "postgres")["ports"][0]["containerPort"]
    assert not any(d["kind"] == "StatefulSet" and d["metadata"]["name"] == "postgres" for d in builds["prod"])


# --- image and compose ----------------------------------------------------------------------------------


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^RUN pip install \.", text, re.M)
    assert dockerfile_user() not in ("root", "0")
    assert config_arg(dockerfile_argv()) == "/etc/lora-gateway/gateway.yaml"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in source.split():
            assert (ROOT / name).exists() and (f"!{name}" in ignore or f"!{name}/**" in ignore), name


_VAR = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.groups()
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op and op.endswith("?") and missing:
            raise ValueError(arg or f"{name} is required")
        if op and op.endswith("-") and missing:
            return arg
        return current or ""

    return _VAR.sub(one, value)


def volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """{container path: source}, for the short `source:target[:mode]` syntax."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    secrets = {
        "LORA_GATEWAY_ADMIN_TOKEN": "test-admin-token",
        "LORA_GATEWAY_ENGINE_API_KEY": "test-engine-key",
    }
    for missing in secrets:  # no admin token, no engine key: compose refuses to start
        with pytest.raises(ValueError, match=missing):
            interpolate(raw, {k: v for k, v in secrets.items() if k != missing})
    compose = interpolate(raw, secrets)
    services = compose["services"]
    assert set(services) == {"gateway", "vllm", "prometheus", "grafana"}
    here = COMPOSE.parent
    for name, service in services.items():
        assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        for target, source in volume_mounts(service).items():
            if source.startswith((".", "/")):
                assert (here / source).exists(), f"{name}: {source} -> {target}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    build = services["gateway"]["build"]
    assert (here / build["context"] / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()

    gateway, vllm = services["gateway"], services["vllm"]
    config = config_arg(dockerfile_argv())
    assert (here / volume_mounts(gateway)[config]).resolve() == here / "gateway.yaml"
    env = {k: str(v) for k, v in gateway["environment"].items()}
    settings = load_gateway_settings((here / "gateway.yaml").read_text(), env, tmp_path, monkeypatch)
    assert settings.auth.admin_token is not None
    assert f"127.0.0.1:{settings.port}:{settings.port}" in gateway["ports"]
    assert settings.adapters_dir is not None and str(settings.adapters_dir) in volume_mounts(gateway)
    assert_engine_agrees(settings, vllm["entrypoint"] + vllm["command"], vllm["environment"], host="vllm")
    # vLLM requires the key the gateway sends, and publishes no port: only this project's services reach it.
    assert settings.engine.api_key is not None
    assert vllm["environment"]["VLLM_API_KEY"] == settings.engine.api_key.get_secret_value()
    assert "--api-key" not in vllm["command"] and "ports" not in vllm
    store = str(settings.data_dir / "adapters")
    assert volume_mounts(gateway)[store] == volume_mounts(vllm)[store]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]

    grafana = volume_mounts(services["grafana"])
    dashboards = next(t for t, s in grafana.items() if s.endswith(DASHBOARD.name))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lora-gateway.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == str(Path(dashboards).parent)
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert targets == {f"gateway:{settings.port}", f"vllm:{urlsplit(settings.engine.url or '').port}"}
    assert (
        volume_mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"]
        == "../prometheus/prometheus.yml"
    )


def test_compose_schema() -> None:
    pytest.importorskip("check_jsonschema", reason="pip install check-jsonschema (ships the compose spec)")
    import importlib.resources

    import jsonschema

    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = [
        f"{e.json_path}: {e.message}" for e in validator.iter_errors(yaml.safe_load(COMPOSE.read_text()))
    ]
    assert not errors, errors


def test_prometheus_kubernetes_config() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    keeps = {tuple(r["source_labels"]) for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert ("__meta_kubernetes_pod_annotation_prometheus_io_scrape",) in keeps


# --- Grafana --------------------------------------------------------------------------------------------

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}


def exposed_metrics() -> dict[str, set[str]]:
    """{sample name: label names} of everything `Metrics` can expose."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    metrics = Metrics()
    out: dict[str, set[str]] = {}
    for attr in vars(metrics).values():
        family = next(iter(attr.describe()), None) if hasattr(attr, "describe") else None
        if family is None:
            continue
        labels = set(attr._labelnames)  # prometheus_client keeps them only here
        for suffix in suffixes[family.type]:
            out[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names grouped by or matched on) in a PromQL expression."""
    labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    stripped = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring)\s*\([^)]*\)', " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?", stripped):
        if not m.group(2) and m.group(1) not in PROMQL_WORDS and not re.fullmatch(r"\d\w*|e\d+", m.group(1)):
            names.add(m.group(1))
    return names, labels


def test_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels if p["type"] != "row" for t in p["targets"]]
    assert all(p["targets"] for p in panels if p["type"] != "row")
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    ours = exposed_metrics()
    used: set[str] = set()
    for expr in exprs:
        names, labels = promql_names(re.sub(r"label_values\((\w+), (\w+)\)", r"\1{\2=\"\"}", expr))
        assert names, expr
        unknown = names - set(ours) - VLLM_METRICS
        assert not unknown, f"unknown metrics {unknown} in {expr}"
        allowed = set().union(*(ours.get(n, VLLM_LABELS) for n in names))
        assert labels <= allowed, f"labels {labels - allowed} not on {names} in {expr}"
        used |= names
    wanted = {
        "lora_gateway_requests_total",
        "lora_gateway_request_errors_total",
        "lora_gateway_request_duration_seconds_bucket",
        "lora_gateway_time_to_first_token_seconds_bucket",
        "lora_gateway_prompt_tokens_total",
        "lora_gateway_completion_tokens_total",
        "lora_gateway_adapter_loads_total",
        "lora_gateway_adapter_evictions_total",
        "lora_gateway_resident_adapters",
        "lora_gateway_engine_up",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
    }
    assert wanted <= used, wanted - used
    assert all(
        t["datasource"]["uid"] == "${datasource}" for p in panels if p["type"] != "row" for t in p["targets"]
    )
