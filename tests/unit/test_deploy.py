"""The Kubernetes deployment (deploy/): every object valid for Kubernetes, and what the docs say.

No cluster and no Helm binary run here. The plain manifests go through the two kustomize
transformers their kustomization.yaml uses (namespace, images); the chart is rendered by
``helm_subset``, which refuses any template feature it does not know. Every object is then
checked against the Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: unknown fields
fail) of the oldest version the deployment supports, 1.30 (the first with
``securityContext.appArmorProfile``), and of the newest the package ships.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from codemode.cli import build_parser
from codemode.config import ExecutorConfig, LimitsConfig
from codemode.config import _defaults as defaults
from codemode.executor.service.server import SERVICE_NAME

from .helm_subset import TemplateError, load_values, merge_values, render_chart

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
CHART = DEPLOY / "helm" / "codemode"
NAMESPACE = "codemode"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

#: What the sandbox needs, and nothing more (measured: docs/threat-model.md).
CAPABILITIES = {"SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE", "SETUID", "SETGID", "SETPCAP", "KILL"}
#: The service waits this long for killed sandboxes to be reaped after the grace.
REAP_WAIT_S = 5
MIB = 1024 * 1024

#: A values override such as `helm install -f my-values.yaml` would pass.
OVERRIDE = {
    "name": "cm-exec",
    "replicas": 4,
    "shutdownGrace": 30,
    "maxConcurrentExecutions": 4,
    "memoryBytes": "536870912",
    "extraEnv": [{"name": "CODEMODE_PRELOAD_MODULES", "value": "json,decimal"}],
    "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "3Gi"}},
    "metrics": {"enabled": False},
    "nodeSelector": {"codemode/executors": "true"},
    "tolerations": [{"key": "codemode", "operator": "Exists", "effect": "NoSchedule"}],
}

_NAMESPACED = {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "Secret"}


def _kustomize() -> list[dict[str, Any]]:
    """deploy/kubernetes as `kubectl apply -k` builds it (namespace and images transformers)."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "resources", "images"}
    assert set(kustomization) <= known, "a kustomize feature this test does not apply"
    images = {i["name"]: i for i in kustomization.get("images", [])}
    objects = []
    for name in kustomization["resources"]:
        for obj in yaml.safe_load_all((MANIFESTS / name).read_text()):
            if obj is None:
                continue
            if obj["kind"] in _NAMESPACED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
            for container in _containers(obj):
                image, _, _ = container["image"].partition(":")
                if image in images:
                    new = images[image]
                    container["image"] = f"{new.get('newName', image)}:{new['newTag']}"
            objects.append(obj)
    return objects


def _helm(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart rendered with its values.yaml, merged with ``values`` like `helm -f`."""
    merged = load_values(CHART / "values.yaml")
    if values is not None:
        merged = merge_values(merged, values)
    rendered = render_chart(CHART, namespace=NAMESPACE, values=merged)
    objects = []
    for name, text in rendered.items():
        if name.endswith((".yaml", ".yml")):
            objects += [o for o in yaml.safe_load_all(text) if o is not None]
    return objects


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    if obj["kind"] != "Deployment":
        return []
    containers: list[dict[str, Any]] = obj["spec"]["template"]["spec"]["containers"]
    return containers


RENDERINGS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "kustomize": _kustomize,
    "helm-defaults": _helm,
    "helm-override": lambda: _helm(OVERRIDE),
}


@pytest.fixture(params=sorted(RENDERINGS))
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """Every object of one rendering of the deployment."""
    return RENDERINGS[request.param]()


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def _executor(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _containers(_one(objects, "Deployment"))
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def _port(container: dict[str, Any], name: str) -> int | None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return ports.get(name)


def _quantity(text: str) -> int:
    units = {"Ki": 1024, "Mi": MIB, "Gi": 1024 * MIB}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", text)
    assert match, text
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def test_kustomization_lists_every_manifest() -> None:
    """kustomization.yaml names every manifest file in deploy/kubernetes, and only those."""
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("rendering", sorted(RENDERINGS))
def test_every_object_is_valid_kubernetes(rendering: str, version: str) -> None:
    """Each rendered object passes the strict Kubernetes schema of that version."""
    objects = RENDERINGS[rendering]()
    assert {o["kind"] for o in objects} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_probes_use_the_grpc_health_service(objects: list[dict[str, Any]]) -> None:
    """Startup, readiness and liveness are native gRPC probes on grpc.health.v1 at the gRPC
    port; readiness asks for the executor service, which turns NOT_SERVING on SIGTERM."""
    container = _executor(objects)
    grpc_port = _port(container, "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(container[probe]) & {"httpGet", "tcpSocket", "exec"} == set()
        assert container[probe]["grpc"]["port"] == grpc_port
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"].get("service", "") == ""


def test_network_policy_denies_all_egress(objects: list[dict[str, Any]]) -> None:
    """The executors' NetworkPolicy allows no egress and ingress only from labelled peers to
    the gRPC (and, when enabled, metrics) port."""
    policy = _one(objects, "NetworkPolicy")
    pod_labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["egress"] == []
    container = _executor(objects)
    allowed = {"grpc"} | ({"metrics"} if _port(container, "metrics") else set())
    for rule in policy["spec"]["ingress"]:
        assert {p["port"] for p in rule["ports"]} <= allowed
        assert rule["from"], "an ingress rule open to every source"
        for peer in rule["from"]:
            assert peer["podSelector"]["matchLabels"], "a peer that is not a labelled pod"


def test_network_policy_can_be_switched_off() -> None:
    """networkPolicy.enabled=false leaves the NetworkPolicy out."""
    objects = _helm({"networkPolicy": {"enabled": False}})
    assert [o for o in objects if o["kind"] == "NetworkPolicy"] == []


def test_security_context_is_what_the_sandbox_needs(objects: list[dict[str, Any]]) -> None:
    """Root, not privileged, all capabilities dropped but the measured seven, seccomp and
    AppArmor unconfined, read-only root, no service account token."""
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert set(pod) & {"hostPID", "hostNetwork", "hostIPC", "hostUsers"} == set()
    context = _executor(objects)["securityContext"]
    assert context["runAsUser"] == 0
    assert context["runAsNonRoot"] is False
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert set(context["capabilities"]["add"]) == CAPABILITIES
    assert context["seccompProfile"] == {"type": "Unconfined"}
    assert context["appArmorProfile"] == {"type": "Unconfined"}
    mounts = {m["mountPath"] for m in _executor(objects)["volumeMounts"]}
    assert mounts == {"/tmp"}


def test_api_key_comes_from_a_secret(objects: list[dict[str, Any]]) -> None:
    """CODEMODE_API_KEY is read from a Secret, never written into the manifest."""
    env = _env(_executor(objects))
    key = env["CODEMODE_API_KEY"]
    assert "value" not in key
    assert set(key["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_service_is_headless_for_dns_round_robin(objects: list[dict[str, Any]]) -> None:
    """A headless Service on the gRPC port selecting the executor pods: its DNS name is the
    one deploy/README.md gives clients."""
    service = _one(objects, "Service")
    pod_labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == _port(_executor(objects), "grpc")
    assert port["targetPort"] == "grpc"
    url = f"dns:///{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port['port']}"
    if service["metadata"]["name"] == "codemode-executor":
        assert url in (DEPLOY / "README.md").read_text()
        assert url == "dns:///codemode-executor.codemode.svc.cluster.local:8001"


def test_grace_period_covers_the_drain(objects: list[dict[str, Any]]) -> None:
    """terminationGracePeriodSeconds = CODEMODE_SHUTDOWN_GRACE + 5 s of reaping + 5 s margin."""
    pod = _one(objects, "Deployment")["spec"]["template"]["spec"]
    grace = float(_env(_executor(objects))["CODEMODE_SHUTDOWN_GRACE"]["value"])
    assert pod["terminationGracePeriodSeconds"] == grace + REAP_WAIT_S + 5


def test_override_changes_what_it_names() -> None:
    """A values override reaches the objects: names, grace, replicas, env, scheduling."""
    objects = _helm(OVERRIDE)
    deployment = _one(objects, "Deployment")
    assert {o["metadata"]["name"] for o in objects} == {"cm-exec"}
    assert deployment["spec"]["replicas"] == 4
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 40
    assert deployment["spec"]["template"]["spec"]["nodeSelector"] == {"codemode/executors": "true"}
    env = _env(_executor(objects))
    assert env["CODEMODE_PRELOAD_MODULES"]["value"] == "json,decimal"
    assert env["CODEMODE_LIMITS__MEMORY_BYTES"]["value"] == "536870912"


def test_disruption_budget_keeps_executors_up(objects: list[dict[str, Any]]) -> None:
    """The PodDisruptionBudget selects the executor pods and lets one go at a time."""
    budget = _one(objects, "PodDisruptionBudget")
    pod_labels = _one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_settings_exist_and_load(
    objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every CODEMODE_* variable is a real ExecutorConfig setting and loads; the arguments
    parse with `codemode serve`'s own parser."""
    container = _executor(objects)
    fields = set(ExecutorConfig.model_fields)
    for name, entry in _env(container).items():
        assert name.startswith("CODEMODE_")
        setting = name.removeprefix("CODEMODE_").lower()
        top, _, nested = setting.partition("__")
        assert top in fields, name
        if nested:
            assert nested in LimitsConfig.model_fields, name
        if name != "CODEMODE_API_KEY":
            monkeypatch.setenv(name, entry["value"])
    monkeypatch.setenv("CODEMODE_API_KEY", "k" * 32)
    config = ExecutorConfig.load()
    assert config.shutdown_grace >= 0
    parsed = build_parser().parse_args(container["args"])
    assert parsed.command == "serve"
    assert parsed.isolation == "auto"
    assert parsed.host == "0.0.0.0"  # noqa: S104 -- the pod's address; the NetworkPolicy guards it
    assert parsed.port == _port(container, "grpc")
    if parsed.metrics_port is not None:
        assert parsed.metrics_port == _port(container, "metrics")
        assert parsed.metrics_host == "0.0.0.0"  # noqa: S104 -- scrapers limited by the policy


def test_memory_limit_covers_the_executions(objects: list[dict[str, Any]]) -> None:
    """The container's memory limit holds every concurrent execution at its limit, with its
    two tmpfs, plus the service; the request covers the service's measured footprint."""
    container = _executor(objects)
    env = _env(container)
    concurrent = int(env["CODEMODE_MAX_CONCURRENT_EXECUTIONS"]["value"])
    memory = int(env["CODEMODE_LIMITS__MEMORY_BYTES"]["value"])
    per_execution = memory + 2 * defaults.TMPFS_BYTES
    limit = _quantity(container["resources"]["limits"]["memory"])
    assert limit >= concurrent * per_execution + 256 * MIB
    assert _quantity(container["resources"]["requests"]["memory"]) >= 128 * MIB


def test_metrics_switch() -> None:
    """Metrics on (the default) add the port named metrics, the scrape annotations, the flags
    and an ingress rule for the port; metrics.enabled=false adds none of them."""
    for on in (_helm(), _kustomize()):
        container = _executor(on)
        assert _port(container, "metrics") == 9464
        assert {"--metrics-port=9464", "--metrics-host=0.0.0.0"} <= set(container["args"])
        annotations = _one(on, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9464"}
        rules = _one(on, "NetworkPolicy")["spec"]["ingress"]
        assert ["metrics"] in [[p["port"] for p in r["ports"]] for r in rules]

    off = _helm({"metrics": {"enabled": False}})
    container = _executor(off)
    assert _port(container, "metrics") is None
    assert not any(a.startswith("--metrics") for a in container["args"])
    assert "annotations" not in _one(off, "Deployment")["spec"]["template"]["metadata"]
    rules = _one(off, "NetworkPolicy")["spec"]["ingress"]
    assert [[p["port"] for p in r["ports"]] for r in rules] == [["grpc"]]


def test_containerfile_installs_the_sandbox() -> None:
    """The image is Debian 12's Python 3.11 with bubblewrap and setpriv, the package installed
    with pip, non-interactively, and `codemode` as its entry point."""
    text = (DEPLOY / "Containerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", text, re.MULTILINE)
    assert "DEBIAN_FRONTEND=noninteractive" in text
    install = re.search(r"apt-get install -y --no-install-recommends ([^\n\\]+)", text)
    assert install is not None
    assert {"bubblewrap", "util-linux", "libseccomp2"} <= set(install.group(1).split())
    assert "RUN pip install /src" in text
    assert re.search(r'^ENTRYPOINT \[.*"codemode"\]$', text, re.MULTILINE)
    image = _executor(_kustomize())["image"]
    assert image.startswith("codemode-executor:")


@pytest.mark.parametrize(
    "template",
    ["{{ range .Values.x }}{{ end }}", '{{ include "x" . }}', "{{ .Values.missing }}"],
)
def test_renderer_refuses_what_it_does_not_know(tmp_path: Path, template: str) -> None:
    """The chart renderer raises on template features and values outside its subset."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("name: t\nversion: 0.1.0\nappVersion: '1'\n")
    (tmp_path / "values.yaml").write_text("x: [1]\n")
    (tmp_path / "templates" / "t.yaml").write_text(template)
    with pytest.raises(TemplateError):
        render_chart(tmp_path)


def test_renderer_prints_numbers_as_helm_does(tmp_path: Path) -> None:
    """Values-file numbers print as Go's %v of a float64, whitespace trims as in Go."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("name: t\nversion: 0.1.0\nappVersion: '1'\n")
    (tmp_path / "values.yaml").write_text("a: 10\nb: 268435456\nc: 1000000\nd: 0.5\n")
    (tmp_path / "templates" / "t.yaml").write_text(
        "x:\n  {{- if .Values.a }} {{ .Values.a }}{{ end }}\n"
        "y: {{ .Values.b }} {{ .Values.c | quote }} {{ add .Values.a 5 }} {{ .Values.d }}\n"
    )
    assert render_chart(tmp_path)["t.yaml"] == 'x: 10\ny: 2.68435456e+08 "1e+06" 15 0.5\n'
