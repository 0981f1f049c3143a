"""The Kubernetes manifests in deploy/k8s, checked offline (no cluster): every overlay is rendered
with kubectl's kustomize and validated strictly against the Kubernetes API schemas of several
versions (kubernetes-validate); the one CRD kind, ServiceMonitor, against a schema of the fields
used written here. Then the rules the manifests promise (docs/deploy.md § Kubernetes): no secret
value in any manifest, hardened pods, pinned images, the migration Job and the readiness gate,
and gateway configurations that name the overlay's real worker Services."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tomllib
import warnings
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCS = ROOT / "docs" / "deploy.md"
OVERLAYS = ["single-region", "multi-region", "external-postgres", "cpu-dev"]
# Schemas shipped by the pinned kubernetes-validate; the oldest is the oldest supported cluster.
KUBERNETES_VERSIONS = ["1.30", "1.33", "1.37"]
TIDEPOOL_IMAGE = "ghcr.io/tidepool/tidepool"
GPU = "nvidia.com/gpu"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
# Which overlays run a database in the cluster, and which worker regions each has.
IN_CLUSTER_DB = {"single-region": True, "multi-region": False, "external-postgres": False, "cpu-dev": True}
REGIONS = {
    "single-region": {"eu-west"},
    "multi-region": {"eu-west", "us-east"},
    "external-postgres": {"eu-west"},
    "cpu-dev": {"eu-west"},
}
# A credential inside a URL: scheme://user:password@host.
CREDENTIAL_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@\"']+:[^\s/@\"']+@", re.IGNORECASE)
SECRET_LIKE_ENV = re.compile(r"(URL|TOKEN|PASSWORD|SECRET|KEY)$")

# The CRD kinds without a Kubernetes schema, each with the schema of the fields these manifests
# use (additionalProperties false: a field not listed here is an error, as in strict mode).
# ServiceMonitor after the Prometheus Operator's CRD: spec.selector is required; Duration is
# its pattern; scheme its enum.
DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "labels": LABELS},
            },
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": LABELS},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port", "path"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                                "interval": {"type": "string", "pattern": DURATION},
                                "scrapeTimeout": {"type": "string", "pattern": DURATION},
                            },
                        },
                    },
                },
            },
        },
    },
}


def kubectl() -> str:
    path = os.environ.get("TIDEPOOL_KUBECTL") or shutil.which("kubectl")
    if not path:
        pytest.exit("no kubectl: run `make k8s-test` (the venv has the pinned one)", returncode=2)
    return path


def render(directory: Path) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def rendered_text(rendered) -> dict[str, str]:
    return {overlay: yaml.safe_dump_all(docs) for overlay, docs in rendered.items()}


def named(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def containers(doc: dict) -> list[dict]:
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec["containers"]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def component(doc: dict) -> str | None:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def gateway(docs: list[dict]) -> dict:
    return named(docs, "Deployment")["tidepool-gateway"]


def workers(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Deployment" and component(d) == "worker"]


def gateway_config(docs: list[dict]) -> tuple[str, dict]:
    """The text and the parsed tidepool.toml of the ConfigMap the gateway mounts."""
    volumes = {v["name"]: v for v in pod_spec(gateway(docs))["volumes"]}
    config_map = named(docs, "ConfigMap")[volumes["config"]["configMap"]["name"]]
    text = config_map["data"]["tidepool.toml"]
    return text, tomllib.loads(text)


def worker_args(worker: dict) -> dict[str, str]:
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "worker", args
    return {args[i].removeprefix("--"): args[i + 1] for i in range(1, len(args), 2)}


# ---------------------------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly_against_the_kubernetes_schemas(rendered, overlay, version):
    errors, crds = [], 0
    for doc in rendered[overlay]:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        crd_schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd_schema is not None:
            crds += 1
            continue  # test_crd_objects_match_their_schema
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: no schema for {doc['apiVersion']} in Kubernetes {version}")
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            errors.append(f"{where}: {path}: {error.message}")
    assert not errors, "\n".join(errors)
    assert crds == 1, "expected exactly one CRD object (the ServiceMonitor)"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_crd_objects_match_their_schema_and_the_servicemonitor_scrapes_the_gateway(rendered, overlay):
    docs = rendered[overlay]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    for doc in monitors:
        jsonschema.validate(doc, CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])])
    monitor = monitors[0]
    service = named(docs, "Service")["tidepool-gateway"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items(), "selects no gateway Service"
    selected = [s for s in docs if s["kind"] == "Service" and selector.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["tidepool-gateway"]
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"
    # It scrapes the unauthenticated metrics listener, not the public one (where /metrics needs
    # the admin token): the Service's port leads to the container port `[server] metrics_listen`
    # names.
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    container = gateway(docs)["spec"]["template"]["spec"]["containers"][0]
    (container_port,) = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    mounted = {
        v["configMap"]["name"]
        for v in gateway(docs)["spec"]["template"]["spec"].get("volumes", [])
        if "configMap" in v
    }
    configs = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] in mounted]
    listens = {tomllib.loads(c["data"]["tidepool.toml"])["server"].get("metrics_listen") for c in configs}
    assert listens == {f"0.0.0.0:{container_port['containerPort']}"}, listens


# ---------------------------------------------------------------------------------------------
# Secrets


def documented_secrets(tmp_path: Path, fixtures: dict[str, str]) -> dict[str, dict[str, str]]:
    """Runs every `kubectl create secret` command of docs/deploy.md's ```sh blocks with
    --dry-run=client on the fixture values; returns {secret: {key: decoded value}}."""
    text = DOCS.read_text()
    section = text[text.index("## Kubernetes") :]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("kubectl create secret"):
                commands.append(command.strip())
    assert len(commands) >= 4, commands
    script = 'kubectl() { "$KUBECTL" "$@" --dry-run=client -o yaml; echo ---; }\n' + "\n".join(commands)
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "KUBECTL": kubectl(), "KUBECONFIG": str(tmp_path / "none"), **fixtures},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    secrets: dict[str, dict[str, str]] = {}
    for doc in yaml.safe_load_all(out.stdout):
        if doc:
            assert doc["kind"] == "Secret"
            values = {k: base64.b64decode(v).decode() for k, v in doc["data"].items()}
            secrets.setdefault(doc["metadata"]["name"], {}).update(values)
    return secrets


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> dict[str, dict[str, str]]:
    fixtures = {
        "PGPASSWORD": "pgfixture" + os.urandom(12).hex(),
        "WORKER_TOKEN": "tp-workerfixture" + os.urandom(12).hex(),
    }
    found = documented_secrets(tmp_path_factory.mktemp("secrets"), fixtures)
    values = [v for keys in found.values() for v in keys.values()]
    for fixture in fixtures.values():
        assert any(fixture in v for v in values), f"{fixture} went into no documented secret"
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_appears_in_any_rendered_overlay(rendered, rendered_text, secrets, overlay):
    text = rendered_text[overlay]
    for name, keys in secrets.items():
        for key, value in keys.items():
            assert len(value) >= 16, f"{name}.{key}: a fixture value too short to search for"
            assert value not in text, f"the value of secret {name}, key {key}, is in {overlay}"
            # The password inside a URL is a secret too.
            for part in re.findall(r"://[^:/@]+:([^@]+)@", value):
                assert part not in text, f"the password of {name}.{key} is in {overlay}"
    assert not CREDENTIAL_URL.search(text), f"a URL with a password: {CREDENTIAL_URL.search(text)[0]}"
    assert not [d for d in rendered[overlay] if d["kind"] == "Secret"], "a Secret object in the manifests"


def test_no_secret_value_or_credential_url_in_the_manifest_sources(secrets):
    values = [v for keys in secrets.values() for v in keys.values()]
    for path in K8S.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not CREDENTIAL_URL.search(text), f"{path}: {CREDENTIAL_URL.search(text)[0]}"
            assert not [v for v in values if v in text], path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_and_every_reference_is_documented(rendered, secrets, overlay):
    refs = set()
    for doc in workloads(rendered[overlay]):
        for container in containers(doc):
            assert "envFrom" not in container, f"{doc['metadata']['name']}: envFrom hides what is read"
            for name, entry in env_of(container).items():
                source = entry.get("valueFrom", {})
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    refs.add((ref["name"], ref["key"]))
                elif SECRET_LIKE_ENV.search(name):
                    raise AssertionError(f"{doc['metadata']['name']}: {name} is not from a Secret")
    assert refs, "no secretKeyRef at all"
    documented = {(name, key) for name, keys in secrets.items() for key in keys}
    assert refs <= documented, f"referenced but not created by docs/deploy.md: {refs - documented}"
    assert ("tidepool-database", "url") in refs
    assert ("tidepool-admin", "token") in refs


# ---------------------------------------------------------------------------------------------
# Pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_hardened_and_pinned(rendered, overlay):
    checked = 0
    for doc in workloads(rendered[overlay]):
        spec = pod_spec(doc)
        pod_security = spec.get("securityContext", {})
        where = f"{overlay} {doc['kind']}/{doc['metadata']['name']}"
        assert spec.get("automountServiceAccountToken") is False, where
        for container in containers(doc):
            security = container.get("securityContext", {})
            at = f"{where} container {container['name']}"

            def effective(key: str):
                return security.get(key, pod_security.get(key))

            assert effective("runAsNonRoot") is True, at
            assert isinstance(effective("runAsUser"), int) and effective("runAsUser") > 0, at
            assert security.get("readOnlyRootFilesystem") is True, at
            assert security.get("allowPrivilegeEscalation") is False, at
            assert security.get("privileged", False) is False, at
            assert security.get("capabilities", {}).get("drop") == ["ALL"], at
            assert not security.get("capabilities", {}).get("add"), at
            assert (effective("seccompProfile") or {}).get("type") == "RuntimeDefault", at
            image = container["image"]
            name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
            assert name and "/" not in tag, f"{at}: untagged image {image}"
            assert tag and tag != "latest", f"{at}: image {image} is not pinned"
            resources = container.get("resources", {})
            assert resources.get("requests") and resources.get("limits"), f"{at}: no resources"
            checked += 1
    assert checked >= 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_release_image_and_a_migration_job_named_after_it(rendered, overlay):
    docs = rendered[overlay]
    images = {
        c["image"]
        for d in workloads(docs)
        for c in containers(d)
        if c["image"].startswith(TIDEPOOL_IMAGE + ":")
    }
    assert len(images) == 1, f"Tidepool containers run different images: {images}"
    tag = images.pop().split(":")[-1]
    jobs = [d for d in docs if d["kind"] == "Job"]
    assert [j["metadata"]["name"] for j in jobs] == [f"tidepool-migrate-{tag}"]
    job = jobs[0]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["tidepool"] and container["args"][0] == "migrate"
    assert job["spec"]["backoffLimit"] >= 5, "the Job must outlast a database that starts slowly"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert "hook" not in str(job["metadata"].get("annotations", {})), "an ordinary resource, not a hook"
    # A Job's pod template is immutable: it must not mount the gateway's hashed ConfigMap.
    assert not [v for v in job["spec"]["template"]["spec"].get("volumes", []) if "configMap" in v]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_probes_and_readiness_gate(rendered, overlay):
    docs = rendered[overlay]
    (container,) = pod_spec(gateway(docs))["containers"]
    assert container["command"] == ["tidepool"] and container["args"] == ["serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway(docs)["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for doc in [gateway(docs), *workers(docs)]:
        (c,) = pod_spec(doc)["containers"]
        assert env_of(c)["TIDEPOOL_SERVER__MIGRATE_ON_START"]["value"] == "false", doc["metadata"]["name"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", doc["metadata"]["name"]
    hpa = named(docs, "HorizontalPodAutoscaler")["tidepool-gateway"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "tidepool-gateway"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert named(docs, "PodDisruptionBudget")["tidepool-gateway"]["apiVersion"] == "policy/v1"
    for account in named(docs, "ServiceAccount").values():
        assert account["automountServiceAccountToken"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_per_region_gpu_variant_and_database(rendered, overlay):
    docs = rendered[overlay]
    regions = set()
    services = named(docs, "Service")
    for worker in workers(docs):
        args = worker_args(worker)
        region = args["region"]
        regions.add(region)
        assert worker["metadata"]["name"] == f"tidepool-worker-{region}"
        assert f"tidepool-worker-{region}" in services
        spec = worker["spec"]["template"]["spec"]
        resources = spec["containers"][0]["resources"]
        if overlay == "cpu-dev":
            assert GPU not in resources.get("requests", {}) and GPU not in resources.get("limits", {})
            assert not spec.get("tolerations") and not spec.get("nodeSelector")
        else:
            assert resources["requests"][GPU] == 1 and resources["limits"][GPU] == 1
            assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert spec["nodeSelector"] == {"topology.kubernetes.io/region": region}
    assert regions == REGIONS[overlay]
    databases = [d for d in docs if d["kind"] == "StatefulSet" and component(d) == "database"]
    assert len(databases) == (1 if IN_CLUSTER_DB[overlay] else 0)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_accept_traffic_only_from_gateways(rendered, overlay):
    docs = rendered[overlay]
    policies = named(docs, "NetworkPolicy")
    policy = policies["tidepool-worker"]["spec"]
    selected = policy["podSelector"]["matchLabels"]
    for worker in workers(docs):
        assert selected.items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}, "only pods of this namespace, no namespace or IP block"
    gateway_labels = gateway(docs)["spec"]["template"]["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert source["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert [p["port"] for p in rule["ports"]] == ["http"]
    gateway_policy = policies["tidepool-gateway"]["spec"]
    assert [p["port"] for p in gateway_policy["ingress"][0]["ports"]] == ["http", "metrics"]


def test_the_documented_models_loader_pod_is_valid_and_hardened(rendered):
    text = DOCS.read_text()
    (manifest,) = re.findall(r"kubectl apply -f - <<'EOF'\n(.*?)\nEOF", text, re.DOTALL)
    pod = yaml.safe_load(manifest)
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    claims = {n for docs in rendered.values() for n in named(docs, "PersistentVolumeClaim")}
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] in claims
    (container,) = pod["spec"]["containers"]
    security = container["securityContext"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert not container["image"].endswith(":latest") and ":" in container["image"]


# ---------------------------------------------------------------------------------------------
# The gateway's configuration against the overlay


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_backends_are_the_overlays_worker_services(rendered, overlay):
    docs = rendered[overlay]
    _, config = gateway_config(docs)
    services = named(docs, "Service")
    (container,) = pod_spec(gateway(docs))["containers"]
    env = env_of(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert config["server"]["models_dir"] == mounts["models"]
    assert env["TIDEPOOL_CONFIG"]["value"] == mounts["config"] + "/tidepool.toml"
    port = container["ports"][0]["containerPort"]
    assert config["server"]["listen"] == f"0.0.0.0:{port}"
    worker_regions = {worker_args(w)["region"]: w for w in workers(docs)}
    backend_regions = set()
    remote = {m["id"] for m in config["models"] if m.get("backend") == "remote"}
    for backend in config["backends"]:
        match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", backend["url"])
        assert match, backend["url"]
        service = services[match[1]]
        assert int(match[2]) in {p["port"] for p in service["spec"]["ports"]}
        region = backend["region"]
        worker = worker_regions[region]
        assert service["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
        assert worker_args(worker)["zone"] == backend["zone"]
        assert backend["api_key_env"] in env, f"{backend['api_key_env']} is not set on the gateway"
        assert set(backend["models"]) <= remote
        backend_regions.add(region)
    assert backend_regions == set(worker_regions), "every worker region is a backend and back"


def tidepool_bin() -> str | None:
    path = os.environ.get("TIDEPOOL_BIN")
    return path if path and Path(path).is_file() else None


def config_keys_known(binary: str, tmp_path: Path) -> str:
    """The effective configuration `tidepool config check` prints for an empty file: every key
    this binary knows (configuration keys added later are not applied to older binaries)."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEPOOL_")}
    out = subprocess.run(
        [binary, "config", "check", "--config", str(empty)],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(tidepool_bin() is None, reason="TIDEPOOL_BIN unset: `make test` builds it first")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tidepool_config_check_accepts_every_rendered_configuration(rendered, tmp_path, overlay):
    """`tidepool config check` on each ConfigMap's tidepool.toml, with the container's
    environment as in the pod: its literal TIDEPOOL_<SECTION>__<KEY> variables, and stand-ins
    for the values its Secrets give."""
    binary = tidepool_bin()
    known = config_keys_known(binary, tmp_path)
    docs = rendered[overlay]
    config_maps = named(docs, "ConfigMap")
    checked = 0
    for doc in [gateway(docs), *workers(docs)]:
        spec = pod_spec(doc)
        (container,) = spec["containers"]
        volume = {v["name"]: v for v in spec["volumes"]}["config"]
        text = config_maps[volume["configMap"]["name"]]["data"]["tidepool.toml"]
        path = tmp_path / f"{doc['metadata']['name']}.toml"
        path.write_text(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEPOOL_")}
        for name, entry in env_of(container).items():
            if "__" in name and "value" in entry:
                key = name.removeprefix("TIDEPOOL_").split("__")[-1].lower()
                if not re.search(rf"(^|\s){re.escape(key)}( =| is unset)", known, re.MULTILINE):
                    warnings.warn(f"{binary} predates the key of {name}; checked without it")
                    continue
                env[name] = entry["value"]
            elif "secretKeyRef" in entry.get("valueFrom", {}):
                env[name] = "stand-in-" + name.lower()
        env["TIDEPOOL_DATABASE_URL"] = "postgres://tidepool@127.0.0.1:5432/tidepool"
        out = subprocess.run(
            [binary, "config", "check", "--config", str(path)],
            env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
        assert out.returncode == 0, f"{doc['metadata']['name']}:\n{out.stdout}\n{out.stderr}"
        checked += 1
    assert checked == 1 + len(REGIONS[overlay])


# ---------------------------------------------------------------------------------------------
# The release component


def test_the_release_tag_moves_every_image_and_the_job_name(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    release = copy / "components" / "release" / "kustomization.yaml"
    text = release.read_text()
    assert "newTag: 0.1.0" in text
    release.write_text(text.replace("newTag: 0.1.0", "newTag: 9.8.7-rc1"))
    docs = render(copy / "overlays" / "multi-region")
    images = {c["image"] for d in workloads(docs) for c in containers(d)}
    assert images == {f"{TIDEPOOL_IMAGE}:9.8.7-rc1"}
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Job"] == ["tidepool-migrate-9.8.7-rc1"]
