"""The Kubernetes manifests (integrations/kubernetes/): every document is valid against the
Kubernetes API schemas (offline, unknown fields rejected), and they agree with each other
and with mtckpt's config file and command line."""

from __future__ import annotations

import copy
import re
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from mtckpt import cli, config
from mtckpt.daemon import config as daemon_config
from mtckpt.format import naming

MANIFESTS = Path(__file__).resolve().parents[2] / "integrations" / "kubernetes" / "base"
# Native sidecars are on by default from 1.29, the preStop sleep action from 1.30.
VERSIONS = ("1.30", kubernetes_validate.latest_version())
DAEMON = "mtckpt-daemon"


def documents() -> list[dict]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's, not a Kubernetes object
            continue
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def the(kind: str, docs: list[dict], name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_every_document_is_valid_against_the_kubernetes_schemas():
    docs = documents()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "DaemonSet", "Job", "Secret", "Service", "Service"]
    errors = []
    for doc in docs:
        for version in VERSIONS:
            try:  # an unknown kind or apiVersion raises SchemaNotFoundError: a failure too
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                errors.append(f"{doc['kind']} {doc['metadata']['name']} ({version}): "
                              f"{where}: {exc.message}")  # fmt: skip
    assert errors == []


@pytest.mark.parametrize(
    "field, value", [("containerPort", "metrics"), ("hostPortt", 9090)], ids=["type", "unknown"]
)
def test_the_validator_rejects_a_broken_manifest(field, value):
    broken = copy.deepcopy(the("DaemonSet", documents()))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0][field] = value
    with pytest.raises(kubernetes_validate.ValidationError, match=field):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_every_config_in_a_configmap_is_one_that_mtckpt_loads(tmp_path):
    configs = [text for doc in documents() if doc["kind"] == "ConfigMap"
               for key, text in doc["data"].items() if key.endswith(".toml")]  # fmt: skip
    assert configs
    for text in configs:
        toml = tmp_path / "mtckpt.toml"
        toml.write_text(text)
        manager = config.load(toml, env={})
        daemon = daemon_config.load_daemon(toml, env={})
        assert manager["memory"].path == daemon["memory_root"]
        assert manager["local"].path == daemon["local_root"]
        assert manager["peers"].daemon == f"unix://{daemon['socket']}"
        assert manager["peers"].token_file == daemon["token_file"]
        assert daemon["metrics_listen"] == "0.0.0.0:9090"


def test_sidecar_job_runs_the_daemon_as_a_native_sidecar(tmp_path):
    docs = documents()
    job = the("Job", docs)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    sidecar = container(pod["initContainers"], DAEMON)
    assert sidecar["restartPolicy"] == "Always"
    assert DAEMON not in [c["name"] for c in pod["containers"]]
    assert "startupProbe" in sidecar  # the trainer starts once the daemon serves
    trainer = container(pod["containers"], "trainer")
    fields = {"metadata.labels['batch.kubernetes.io/job-name']": job["metadata"]["name"],
              "metadata.annotations['batch.kubernetes.io/job-completion-index']": "1"}  # fmt: skip
    settings, volumes = check_daemon_pod(job, sidecar, trainer, docs, fields, tmp_path)
    assert settings["node_id"] == f"{job['metadata']['name']}-1"  # the index, not the pod name
    memory = volumes[settings["memory_root"]]
    assert memory["emptyDir"]["medium"] == "Memory" and memory["emptyDir"]["sizeLimit"]
    assert "emptyDir" in volumes[str(PurePosixPath(settings["socket"]).parent)]
    assert pod["subdomain"] == service_for(job, docs)["metadata"]["name"]
    args = [expand(a, env_of(trainer, fields)) for a in trainer["args"]]
    assert "--node-rank=1" in args  # a node's ranks stay with its node id
    assert f"--master-addr={job['metadata']['name']}-0.{pod['subdomain']}" in args


def test_daemonset_shares_host_directories_and_is_found_through_its_service(tmp_path):
    docs = documents()
    daemonset = the("DaemonSet", docs)
    pod = daemonset["spec"]["template"]["spec"]
    daemon = container(pod["containers"], DAEMON)
    fields = {"spec.nodeName": "gpu-node-7"}
    settings, volumes = check_daemon_pod(daemonset, daemon, None, docs, fields, tmp_path)
    assert settings["node_id"] == "gpu-node-7"
    assert volumes[settings["memory_root"]]["hostPath"]["path"].startswith("/dev/shm/")
    assert "hostPath" in volumes[str(PurePosixPath(settings["socket"]).parent)]
    assert service_for(daemonset, docs)["spec"]["publishNotReadyAddresses"] is True
    assert daemon["lifecycle"]["preStop"]
    for resources in ("requests", "limits"):
        assert daemon["resources"][resources]["memory"]
    assert daemon["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True


def check_daemon_pod(workload, daemon, trainer, docs, fields, tmp_path):
    """Check what both layouts must get right; return the daemon's settings and the volume
    at each path they name."""
    template = workload["spec"]["template"]
    pod = template["spec"]
    args = cli.parser().parse_args(daemon["command"][1:])
    assert daemon["command"][0] == "mtckpt" and args.command == "daemon"
    toml = tmp_path / "mtckpt.toml"
    toml.write_text(the_file(pod, daemon, args.config, docs))
    settings = daemon_config.load_daemon(toml, env=env_of(daemon, fields))
    naming.check_node_id(settings["node_id"])
    paths = [settings["memory_root"], settings["local_root"],
             str(PurePosixPath(settings["socket"]).parent)]  # fmt: skip
    volumes = {path: volume_at(pod, daemon, path) for path in paths}
    assert the_file(pod, daemon, settings["token_file"], docs, kind="Secret")

    metrics_port = int(settings["metrics_listen"].rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in daemon["ports"]}
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    for probe, path in [("startupProbe", "/readyz"), ("readinessProbe", "/readyz"),
                        ("livenessProbe", "/healthz")]:  # fmt: skip
        get = daemon[probe]["httpGet"]
        assert (get["path"], ports.get(get["port"], get["port"])) == (path, metrics_port)
    listen_port = int(settings["listen"].rpartition(":")[2])
    assert {listen_port, settings["data_port"]} <= set(ports.values())

    service = service_for(workload, docs)
    assert service["spec"]["clusterIP"] == "None"
    assert settings["peers_dns"] == f"{service['metadata']['name']}:{listen_port}"
    assert listen_port in [p["port"] for p in service["spec"]["ports"]]

    pre_stop = daemon.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + settings["drain_timeout"] + 10

    if trainer is not None:  # the same volumes at the same paths, and the same config
        for path in paths:
            assert mount_at(trainer, path) == mount_at(daemon, path), path
        config_path = env_of(trainer, fields)["MTCKPT_CONFIG"]
        toml.write_text(the_file(pod, trainer, config_path, docs))
        assert config.load(toml, env={})["memory"].path == settings["memory_root"]
    return settings, volumes


def container(containers: list[dict], name: str) -> dict:
    return next(c for c in containers if c["name"] == name)


def service_for(workload: dict, docs: list[dict]) -> dict:
    """The one Service whose selector picks the workload's pods."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    services = [s for s in docs if s["kind"] == "Service"
                and s["spec"]["selector"].items() <= labels.items()]  # fmt: skip
    assert len(services) == 1, services
    return services[0]


def env_of(c: dict, fields: dict[str, str]) -> dict[str, str]:
    """The container's variables as the kubelet sets them, downward API ones from ``fields``."""
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), text)


def mount_at(c: dict, path: str) -> dict:
    """The mount holding ``path`` (the deepest one)."""
    holding = [m for m in c["volumeMounts"] if PurePosixPath(path).is_relative_to(m["mountPath"])]
    assert holding, f"{c['name']}: nothing mounted at {path}"
    return max(holding, key=lambda m: len(m["mountPath"]))


def volume_at(pod: dict, c: dict, path: str) -> dict:
    name = mount_at(c, path)["name"]
    return next(v for v in pod["volumes"] if v["name"] == name)


def the_file(pod: dict, c: dict, path: str, docs: list[dict], kind: str = "ConfigMap") -> str:
    """The text the container sees at ``path``, from a key of a ConfigMap (or Secret) that a
    projected volume mounts there."""
    inside = str(PurePosixPath(path).relative_to(mount_at(c, path)["mountPath"]))
    source_kind = kind[0].lower() + kind[1:]  # configMap, secret
    for source in volume_at(pod, c, path)["projected"]["sources"]:
        for item in source.get(source_kind, {}).get("items", []):
            if item["path"] == inside:
                doc = the(kind, docs, source[source_kind]["name"])
                return doc.get("data", doc.get("stringData"))[item["key"]]
    raise AssertionError(f"{c['name']}: no {kind} key at {path}")


def test_the_secret_placeholder_is_refused_as_a_token(tmp_path):
    from mtckpt.daemon.auth import read_token
    from mtckpt.errors import ConfigError

    placeholder = the("Secret", documents())["stringData"]["token"]
    (tmp_path / "token").write_text(placeholder)
    with pytest.raises(ConfigError, match="printable ASCII characters without spaces"):
        read_token(str(tmp_path / "token"))


def test_the_example_overlay_renders_with_kustomize_and_validates(tmp_path):
    """overlays/example adapts the base without editing it: images, node count, memory
    size and a generated token Secret, rendered by `kubectl kustomize`, every object valid."""
    import secrets
    import shutil
    import subprocess

    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is needed (Debian: kubernetes-client; .ci/run installs it)")
    tree = tmp_path / "kubernetes"
    shutil.copytree(MANIFESTS.parent, tree)
    token = secrets.token_hex(32)
    (tree / "overlays" / "example" / "token").write_text(token)
    done = subprocess.run(["kubectl", "kustomize", str(tree / "overlays" / "example")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Job", "Secret", "Service"]
    for doc in docs:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    secret, job = the("Secret", docs), the("Job", docs)
    assert secret["metadata"]["name"] == "mtckpt-token"  # the name the pods mount
    import base64

    assert base64.b64decode(secret["data"]["token"]).decode() == token
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    sources = volumes["config"]["projected"]["sources"]
    assert {"secret"} <= {k for s in sources for k in s}
    assert secret["metadata"]["name"] in [s["secret"]["name"] for s in sources if "secret" in s]
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (4, 4)
    trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
    assert trainer["args"][0] == "--nnodes=4"
    assert trainer["image"] == "registry.example.com/my-team/trainer:2.0"
    daemon = next(c for c in pod["initContainers"] if c["name"] == DAEMON)
    assert daemon["image"] == "registry.example.com/my-team/mtckpt:0.1.0"
    assert volumes["memory"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "128Gi"}
