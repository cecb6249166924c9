"""infra/k8s (a kustomize base and a GPU overlay), rendered by `kubectl kustomize` and checked.

No cluster runs here, so the rendered objects are validated against the Kubernetes API schema (strict: an
unknown field is an error) and compared with what is already checked elsewhere: docker-compose.yml (images,
the project's environment, Kafka, Connect and Postgres settings; tests/unit/test_compose.py holds those
against the native stack), the settings classes, the retriever's routes and the project image. Each check
returns its problems, and a mutated copy proves that it can fail.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from ragtide.contracts.errors import ConfigError
from ragtide.contracts.settings import REPO_ROOT, RagtideSettings, load_settings
from ragtide.embedder.index.memory import MemoryIndex
from ragtide.gateway.gateway import check_config
from ragtide.ingest.sources import SourcesConfig, SourceTable, load_sources
from ragtide.retriever.app import create_app
from tests.deploy import (
    DOCKERFILE,
    PROJECT_SERVICES,
    SECRET_NAME,
    SHELL_ENV,
    command_words,
    environment,
    image_tag,
    interpolate,
    listener_map,
    load_compose,
    mutated,
    settings_env_problems,
    settings_from,
)
from tests.doubles import HashEncoder

pytestmark = pytest.mark.unit
MonkeyPatch = pytest.MonkeyPatch

K8S = REPO_ROOT / "infra" / "k8s"
BASE, GPU = K8S / "base", K8S / "overlays" / "gpu"
KUBERNETES = "1.32"  # the API version the schema check uses (kubectl here is 1.32)
SECRET = "ragtide-secrets"
SECRETS = {"postgres-password": SHELL_ENV["POSTGRES_PASSWORD"], "admin-key": SHELL_ENV["RAGTIDE_ADMIN_KEY"]}
WORKLOADS = ("Deployment", "StatefulSet", "Job")
# What may differ from docker-compose.yml's environment for the same service, and why.
K8S_ONLY_ENV = {
    "RAGTIDE_SOURCES_FILE",  # mounted from the ConfigMap ragtide-sources, not baked into the image
    "QDRANT_URL",  # the qdrant Service spreads over the nodes and drops one that is not ready; compose lists them
    "RAGTIDE_KAFKA__BOOTSTRAP_SERVERS",  # every broker: compose's services, the kafka StatefulSet's pods here
}
# apache/kafka's start command (its Dockerfile's CMD): the kafka container's wrapper execs it.
KAFKA_RUN = "/etc/kafka/docker/run"
# What the wrapper sets from the pod's name; the rest of the environment is docker-compose.yml's.
KAFKA_POD_ENV = ("KAFKA_NODE_ID", "KAFKA_ADVERTISED_LISTENERS")
VOTERS = "KAFKA_CONTROLLER_QUORUM_VOTERS"

Obj = dict[str, Any]


@functools.cache
def _rendered(path: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl (with its built-in kustomize) on this machine")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def render(path: Path) -> list[Obj]:
    """The objects `kubectl apply -k path` would send (a fresh copy each call: tests mutate them)."""
    return [d for d in yaml.safe_load_all(_rendered(path)) if d]


@pytest.fixture
def base() -> list[Obj]:
    return render(BASE)


@pytest.fixture
def gpu() -> list[Obj]:
    return render(GPU)


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    """One object by kind and name; a generated ConfigMap is found by its name before kustomize's hash."""
    for o in objs:
        if o["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", o["metadata"]["name"]):
            return o
    raise KeyError(f"{kind}/{name}")


def pod(obj: Obj) -> Obj:
    spec: Obj = obj["spec"]["template"]["spec"]
    return spec


def container(obj: Obj) -> Obj:
    containers: list[Obj] = pod(obj)["containers"]
    assert len(containers) == 1, obj["metadata"]["name"]
    return containers[0]


def workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in objs if o["kind"] in WORKLOADS]


def project_workloads(objs: list[Obj]) -> list[Obj]:
    return [o for o in workloads(objs) if container(o)["image"].split(":")[0] == "ragtide"]


def container_env(objs: list[Obj], c: Obj, secrets: Mapping[str, str] = SECRETS) -> dict[str, str]:
    """The environment the container sees: its ConfigMaps, then its own variables (which win)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(find(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif ref := var["valueFrom"].get("secretKeyRef"):
            if ref["key"] in secrets:
                env[var["name"]] = secrets[ref["key"]]
            elif not ref.get("optional"):
                raise KeyError(f"secret key {ref['key']} is required")
        elif ref := var["valueFrom"].get("fieldRef"):
            env[var["name"]] = f"<{ref['fieldPath']}>"
    return env


def container_ports(obj: Obj) -> dict[str | int, int]:
    """Port name and number -> number, for every container port of the workload's pod."""
    out: dict[str | int, int] = {}
    for c in pod(obj)["containers"]:
        for p in c.get("ports", []):
            out[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                out[p["name"]] = p["containerPort"]
    return out


def service_port(objs: list[Obj], host: str, port: int) -> list[str]:
    """`host:port` is a Service of these objects that forwards to a container port of its pods."""
    try:
        svc = find(objs, "Service", host)
    except KeyError:
        return [f"{host} is not a Service"]
    ports = [p for p in svc["spec"]["ports"] if p["port"] == port]
    if not ports:
        return [f"Service {host} has no port {port}"]
    selector = svc["spec"]["selector"]
    backends = [w for w in workloads(objs) if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
    if not backends:
        return [f"Service {host} selects no workload"]
    target = ports[0].get("targetPort", port)
    return [
        f"Service {host}:{port} targets {target!r}, not a port of its pods"
        for w in backends
        if target not in container_ports(w)
    ]


def pod_endpoint(objs: list[Obj], host: str, port: int) -> list[str]:
    """`host:port` reaches a pod: a Service (see `service_port`), or `<pod>.<service>`, a pod of the StatefulSet
    whose headless governing Service that is, listening on the port."""
    pod_name, dot, service = host.partition(".")
    if not dot:
        return service_port(objs, host, port)
    for w in workloads(objs):
        name, spec = w["metadata"]["name"], w["spec"]
        if w["kind"] != "StatefulSet" or spec.get("serviceName") != service:
            continue
        ordinal = pod_name.removeprefix(f"{name}-")
        if not pod_name.startswith(f"{name}-") or not ordinal.isdigit() or int(ordinal) >= spec["replicas"]:
            return [f"{host}: StatefulSet {name} has no pod {pod_name}"]
        if find(objs, "Service", service)["spec"].get("clusterIP") != "None":
            return [f"{host}: Service {service} is not headless (no name per pod)"]
        if port not in container_ports(w):
            return [f"{host}: pod {pod_name} does not listen on {port}"]
        return []
    return [f"{host} is not a pod of a StatefulSet under its Service {service}"]


def server_list(value: str) -> list[tuple[str, int]]:
    """`a:9092,b:9092` -> [("a", 9092), ("b", 9092)] (a bootstrap.servers value)."""
    return [(host, int(port)) for host, _, port in (s.strip().rpartition(":") for s in value.split(",") if s)]


def kafka_pods(objs: list[Obj]) -> list[str]:
    """The kafka StatefulSet's pods by their names under its Service (`kafka-0.kafka`, ...)."""
    sts = find(objs, "StatefulSet", "kafka")
    name, spec = sts["metadata"]["name"], sts["spec"]
    return [f"{name}-{i}.{spec['serviceName']}" for i in range(spec["replicas"])]


def kafka_bootstrap(objs: list[Obj]) -> str:
    """Every broker's client listener: what the project and Connect bootstrap from."""
    env = container_env(objs, container(find(objs, "StatefulSet", "kafka")))
    port = listener_map(env.get("KAFKA_LISTENERS", "")).get("PLAINTEXT", ("", 0))[1]
    return ",".join(f"{pod}:{port}" for pod in kafka_pods(objs))


def kafka_pod_env(c: Obj, env: Mapping[str, str], hostname: str) -> dict[str, str]:
    """What the kafka container's wrapper changes in the environment of the pod `hostname` before it execs the
    image's start command: its script is run by bash with that command replaced by `env`. ValueError if it is not
    `bash -c <script>` ending in `exec KAFKA_RUN`."""
    words = [*c.get("command", []), *c.get("args", [])]
    lines = [line.strip() for line in words[-1].strip().splitlines()] if len(words) == 3 else []
    if words[:2] != ["bash", "-c"] or not lines or lines[-1] != f"exec {KAFKA_RUN}":
        raise ValueError(f"kafka: the container must run `bash -c <script>` that ends in `exec {KAFKA_RUN}`: {words}")
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash to run the kafka container's wrapper with")
    given = {**env, "HOSTNAME": hostname, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    script = "\n".join([*lines[:-1], "exec env -0"])
    done = subprocess.run([bash, "-c", script], env=given, capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise ValueError(f"kafka: the wrapper fails in pod {hostname}: {done.stderr.strip()}")
    seen = dict(item.split("=", 1) for item in done.stdout.split("\0") if "=" in item)
    return {k: v for k, v in seen.items() if given.get(k) != v and k not in ("PWD", "SHLVL", "_", "OLDPWD")}


def kafka_problems(objs: list[Obj]) -> list[str]:
    """The kafka StatefulSet is docker-compose.yml's quorum: as many brokers, compose's `kafka` environment but
    for what each pod sets from its name (node id ordinal+1, its own advertised address) and voters that name the
    pods through the headless Service; started in parallel (a pod is ready only once a majority runs)."""
    compose = load_compose()
    brokers = [n for n in compose["services"] if image_tag(compose, n)[0] == "apache/kafka"]
    sts = find(objs, "StatefulSet", "kafka")
    c, spec = container(sts), sts["spec"]
    env = container_env(objs, c)
    problems = []
    if spec["replicas"] != len(brokers):
        problems.append(f"kafka: {spec['replicas']} replicas, docker-compose.yml runs {len(brokers)} brokers")
    if spec.get("podManagementPolicy") != "Parallel":
        problems.append("kafka: podManagementPolicy must be Parallel (OrderedReady waits forever for a quorum)")
    if set(env) & set(KAFKA_POD_ENV):
        problems.append(f"kafka: {sorted(set(env) & set(KAFKA_POD_ENV))} differ per pod: the wrapper sets them")
    expected = {k: v for k, v in environment(compose, "kafka").items() if k not in (*KAFKA_POD_ENV, VOTERS)}
    if {k: v for k, v in env.items() if k not in (*KAFKA_POD_ENV, VOTERS)} != expected:
        diff = sorted(k for k in set(env) | set(expected) if k != VOTERS and env.get(k) != expected.get(k))
        problems.append(f"kafka: the environment is not docker-compose.yml's: {diff}")
    listeners = listener_map(env.get("KAFKA_LISTENERS", ""))
    client, controller = listeners.get("PLAINTEXT", ("", 0))[1], listeners.get("CONTROLLER", ("", 0))[1]
    pods = kafka_pods(objs)
    voters = ",".join(f"{i + 1}@{pod}:{controller}" for i, pod in enumerate(pods))
    if env.get(VOTERS) != voters:
        problems.append(f"kafka: voters {env.get(VOTERS)!r}, the StatefulSet's pods are {voters!r}")
    for i, pod in enumerate(pods):
        try:
            got = kafka_pod_env(c, env, pod.split(".")[0])
        except ValueError as exc:
            return [*problems, str(exc)]
        want = {"KAFKA_NODE_ID": str(i + 1), "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{pod}:{client}"}
        if got != want:
            problems.append(f"kafka: pod {pod.split('.')[0]} sets {got}, not {want}")
    logs = env.get("KAFKA_LOG_DIRS", "")
    if not any(logs.startswith(m["mountPath"] + "/") for m in c["volumeMounts"]):
        problems.append(f"kafka: log dir {logs} is not a directory inside a volume")
    if not any(
        t["metadata"]["name"] == m["name"] for t in spec.get("volumeClaimTemplates", []) for m in c["volumeMounts"]
    ):
        problems.append("kafka: each pod needs a volume of its own (a volumeClaimTemplate)")
    svc = find(objs, "Service", spec["serviceName"])["spec"]
    if svc.get("clusterIP") != "None" or not svc.get("publishNotReadyAddresses"):
        problems.append(
            "kafka: its Service must be headless and publish the pods before they are ready (they are the quorum)"
        )
    return problems


# --- the checks -------------------------------------------------------------------------------------------


def schema_problems(objs: list[Obj]) -> list[str]:
    problems = []
    for o in objs:
        try:
            kubernetes_validate.validate(o, KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{o['kind']}/{o['metadata']['name']}: {exc.message}")
    return problems


def service_problems(objs: list[Obj]) -> list[str]:
    """Every Service selects a workload and forwards each port to a port its pods listen on."""
    return [
        p
        for s in objs
        if s["kind"] == "Service"
        for q in s["spec"]["ports"]
        for p in service_port(objs, s["metadata"]["name"], q["port"])
    ]


def image_problems(objs: list[Obj]) -> list[str]:
    """The images docker-compose.yml runs (held to pom.xml and constraints.txt by its own test)."""
    compose = load_compose()["services"]
    problems = []
    for w in workloads(objs):
        name, image = w["metadata"]["name"], container(w)["image"]
        expected = compose["retriever" if image.startswith("ragtide") else name]["image"]
        if image != expected:
            problems.append(f"{w['kind']}/{name} runs {image}, docker-compose.yml {expected}")
    return problems


def env_problems(objs: list[Obj], monkeypatch: MonkeyPatch, gpu: bool = False) -> list[str]:
    """Each project container's environment names real settings, builds them, passes the gateway's prod check,
    points at Services that exist, and equals docker-compose.yml's for the same service (with
    docker-compose.gpu.yml merged in for the GPU overlay)."""
    problems = []
    compose = load_compose(gpu)
    for w in project_workloads(objs):
        name, c = w["metadata"]["name"], container(w)
        env = container_env(objs, c)
        problems += [f"{name}: {p}" for p in settings_env_problems(env)]
        try:
            s = settings_from(env, monkeypatch)
            check_config(s)
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
            continue
        qdrant = urlsplit(s.qdrant_url or "")
        for host, port in [
            (s.postgres.host, s.postgres.port),
            *server_list(s.kafka.bootstrap),
            (s.connect.host, s.connect.port),
            (qdrant.hostname or "", qdrant.port or 0),
        ]:
            problems += [f"{name}: {p}" for p in pod_endpoint(objs, host, port)]
        if s.kafka.bootstrap != kafka_bootstrap(objs):
            problems.append(f"{name}: kafka {s.kafka.bootstrap}, not every broker {kafka_bootstrap(objs)}")
        compose_env = environment(compose, name)
        for key in sorted((set(env) | set(compose_env)) - K8S_ONLY_ENV):
            if env.get(key) != compose_env.get(key):
                problems.append(f"{name}: {key}={env.get(key)!r}, docker-compose.yml {compose_env.get(key)!r}")
        problems += sources_problems(objs, w, s)
    return problems


def sources_problems(objs: list[Obj], w: Obj, s: RagtideSettings) -> list[str]:
    """RAGTIDE_SOURCES_FILE is a file of a mounted ConfigMap, and that file is config/sources.yaml."""
    name, path = w["metadata"]["name"], Path(s.sources_file)
    mounts = {m["name"]: m["mountPath"] for m in container(w).get("volumeMounts", [])}
    for vol in pod(w).get("volumes", []):
        if "configMap" in vol and mounts.get(vol["name"]) == str(path.parent):
            data = find(objs, "ConfigMap", vol["configMap"]["name"]).get("data", {})
            if data.get(path.name) != (REPO_ROOT / "config" / "sources.yaml").read_text(encoding="utf-8"):
                return [f"{name}: {path} is not config/sources.yaml"]
            return []
    return [f"{name}: no ConfigMap is mounted at {path.parent}"]


def secret_problems(objs: list[Obj]) -> list[str]:
    """Secrets come from the Secret the user creates, never from a value or a ConfigMap in these files."""
    problems = [
        f"{o['kind']}/{o['metadata']['name']}: a Secret in the manifests" for o in objs if o["kind"] == "Secret"
    ]
    for o in objs:
        if o["kind"] == "ConfigMap":
            problems += [
                f"ConfigMap {o['metadata']['name']}: {k} is a secret"
                for k in o.get("data", {})
                if SECRET_NAME.search(k)
            ]
    for w in workloads(objs):
        for var in container(w).get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef", {})
            if SECRET_NAME.search(var["name"]) and ref.get("name") != SECRET:
                problems.append(f"{w['metadata']['name']}: {var['name']} must come from the Secret {SECRET}")
    return problems


def stack_problems(objs: list[Obj]) -> list[str]:
    """Postgres, Kafka and Connect run as docker-compose.yml runs them."""
    compose = load_compose()
    problems = []
    pg = container(find(objs, "StatefulSet", "postgres"))
    if pg.get("args") != command_words(compose["services"]["postgres"])[1:]:
        problems.append(f"postgres args {pg.get('args')} are not docker-compose.yml's server settings")
    pg_env = container_env(objs, pg)
    for key in ("POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD"):
        if pg_env.get(key) != environment(compose, "postgres").get(key):
            problems.append(f"postgres: {key} differs from docker-compose.yml")
    if not any(
        m["mountPath"] in pg_env.get("PGDATA", "/") and m["mountPath"] != pg_env.get("PGDATA")
        for m in pg["volumeMounts"]
    ):
        problems.append("postgres: PGDATA must be a directory inside the volume (its root holds lost+found)")
    problems += kafka_problems(objs)
    connect_env = container_env(objs, container(find(objs, "Deployment", "connect")))
    expected = {
        **environment(compose, "connect"),
        "ADVERTISED_HOST_NAME": "<status.podIP>",
        "BOOTSTRAP_SERVERS": kafka_bootstrap(objs),
    }
    if connect_env != expected:
        diff = sorted(k for k in set(connect_env) | set(expected) if connect_env.get(k) != expected.get(k))
        problems.append(
            f"connect: {diff} differ from docker-compose.yml (the pod IP is advertised, every kafka pod bootstrapped)"
        )
    return problems


def probe_problems(objs: list[Obj]) -> list[str]:
    """The retriever's probes ask routes the app has, on its API port; readiness leaves the canary out. The
    embedder's ask its /healthz."""
    w = find(objs, "Deployment", "retriever")
    c = container(w)
    port = int(container_env(objs, c)["RAGTIDE_API__PORT"])
    app = create_app(
        load_settings(RagtideSettings, canary={"enabled": False}),
        MemoryIndex(),
        HashEncoder(),
        SourcesConfig(sources=(SourceTable(table="public.docs", key=("id",), text="{body}"),)),
    )
    spec = app.openapi()["paths"]
    problems = []
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c.get(kind, {}).get("httpGet")
        if get is None:
            problems.append(f"retriever: no HTTP {kind}")
            continue
        path, _, query = get["path"].partition("?")
        if container_ports(w).get(get["port"]) != port:
            problems.append(f"retriever: {kind} asks port {get['port']}, the API is on {port}")
        params = {p["name"] for p in spec.get(path, {}).get("get", {}).get("parameters", [])}
        if path not in spec or not {q.split("=")[0] for q in query.split("&") if q} <= params:
            problems.append(f"retriever: {kind} asks {get['path']}, not a route of the app")
    if c["readinessProbe"]["httpGet"]["path"] != "/readyz?freshness=false":
        problems.append("retriever: readiness must leave the canary out (/readyz?freshness=false)")
    e = find(objs, "Deployment", "embedder")  # `ragtide embedder` serves /healthz and /metrics on the API port
    for kind in ("startupProbe", "livenessProbe"):
        get = container(e).get(kind, {}).get("httpGet", {})
        if get.get("path") != "/healthz" or container_ports(e).get(get.get("port")) != port:
            problems.append(f"embedder: {kind} must ask /healthz on port {port}")
    return problems


def scale_problems(objs: list[Obj]) -> list[str]:
    """Embedders: no more than the topics' partitions, never two configurations at once. Retrievers: at least
    two, kept through voluntary disruptions, scaled on CPU."""
    problems = []
    embedder = find(objs, "Deployment", "embedder")
    partitions = int(container_env(objs, container(embedder))["RAGTIDE_KAFKA__PARTITIONS"])
    if embedder["spec"]["replicas"] > partitions:
        problems.append(f"embedder: {embedder['spec']['replicas']} replicas, {partitions} partitions")
    qdrant = find(objs, "StatefulSet", "qdrant")
    copies = int(container_env(objs, container(embedder)).get("RAGTIDE_INDEX__REPLICATION_FACTOR", "1"))
    if qdrant["spec"]["replicas"] < max(3, copies + 1):
        problems.append(f"qdrant: {qdrant['spec']['replicas']} nodes cannot keep {copies} copies through a node loss")
    if container_env(objs, container(qdrant)).get("QDRANT__CLUSTER__ENABLED") != "true":
        problems.append("qdrant: the nodes must run in distributed mode (QDRANT__CLUSTER__ENABLED)")
    if embedder["spec"].get("strategy", {}).get("type") != "Recreate":
        problems.append("embedder: a rolling update runs two configurations at once; use Recreate")
    labels = find(objs, "Deployment", "retriever")["spec"]["template"]["metadata"]["labels"]
    hpa = find(objs, "HorizontalPodAutoscaler", "retriever")["spec"]
    if hpa["scaleTargetRef"]["name"] != "retriever" or hpa["minReplicas"] < 2:
        problems.append("retriever: the autoscaler must target it with at least 2 replicas")
    pdb = find(objs, "PodDisruptionBudget", "retriever")["spec"]
    if not pdb["selector"]["matchLabels"].items() <= labels.items():
        problems.append("retriever: the disruption budget selects other pods")
    for quorum in ("kafka", "qdrant"):  # a drain or a lost node takes one member of the quorum, not two
        members = find(objs, "StatefulSet", quorum)
        own = members["spec"]["template"]["metadata"]["labels"]
        budgets = [o["spec"] for o in objs if o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == quorum]
        if not budgets or budgets[0].get("maxUnavailable") != 1 or budgets[0]["selector"]["matchLabels"] != own:
            problems.append(f"{quorum}: needs a disruption budget of maxUnavailable 1 over its pods")
        spread = pod(members).get("affinity", {}).get("podAntiAffinity", {})
        terms = [t["podAffinityTerm"] for t in spread.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
        if not any(
            t["topologyKey"] == "kubernetes.io/hostname" and t["labelSelector"]["matchLabels"] == own for t in terms
        ):
            problems.append(f"{quorum}: its pods must prefer different Kubernetes nodes (podAntiAffinity)")
    return problems


def dockerfile_uid() -> int:
    m = re.search(r"useradd [^&]*--uid (\d+)", DOCKERFILE.read_text(encoding="utf-8"))
    assert m, "the Dockerfile creates no user with a fixed uid"
    return int(m.group(1))


def security_problems(objs: list[Obj]) -> list[str]:
    """Project pods meet the 'restricted' Pod Security Standard, as the image's own non-root user."""
    problems = []
    for w in project_workloads(objs):
        name, ps, cs = w["metadata"]["name"], pod(w).get("securityContext", {}), container(w).get("securityContext", {})
        if not ps.get("runAsNonRoot") or ps.get("runAsUser") != dockerfile_uid():
            problems.append(f"{name}: must run as the image's user {dockerfile_uid()} (runAsNonRoot)")
        if ps.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: seccompProfile RuntimeDefault")
        if cs.get("allowPrivilegeEscalation") is not False or cs.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: no privilege escalation, capabilities drop ALL")
    return problems


ALL_CHECKS: list[Callable[[list[Obj]], list[str]]] = [
    schema_problems,
    service_problems,
    image_problems,
    secret_problems,
    stack_problems,
    probe_problems,
    scale_problems,
    security_problems,
]


# --- the tests --------------------------------------------------------------------------------------------


def set_env(kind: str, name: str, var: str, value: str) -> Callable[[list[Obj]], object]:
    def change(objs: list[Obj]) -> None:
        env = container(find(objs, kind, name)).setdefault("env", [])
        env[:] = [v for v in env if v["name"] != var] + [{"name": var, "value": value}]

    return change


def edit(kind: str, name: str, change: Callable[[Obj], object]) -> Callable[[list[Obj]], object]:
    return lambda objs: change(find(objs, kind, name))


@pytest.mark.parametrize("overlay", [BASE, GPU], ids=["base", "gpu"])
def test_the_manifests_pass_every_check(overlay: Path, monkeypatch: MonkeyPatch) -> None:
    objs = render(overlay)
    expected = {("Deployment", "retriever"), ("Deployment", "embedder"), ("Job", "connector-init")}
    assert {(w["kind"], w["metadata"]["name"]) for w in project_workloads(objs)} == expected
    assert {w["metadata"]["name"] for w in project_workloads(objs)} == set(PROJECT_SERVICES)
    assert all(o["metadata"].get("namespace") == "ragtide" for o in objs)
    for check in ALL_CHECKS:
        assert check(objs) == [], check.__name__
    assert env_problems(objs, monkeypatch, gpu=overlay == GPU) == []


def test_the_schema_check_catches_typos_and_wrong_types(base: list[Obj]) -> None:
    typo = mutated(
        base, edit("Deployment", "retriever", lambda d: container(d)["readinessProbe"]["httpGet"].update(porrt=1))
    )
    assert any("porrt" in p for p in schema_problems(typo))
    wrong_type = mutated(base, edit("Deployment", "retriever", lambda d: d["spec"].update(replicas="two")))
    assert any("retriever" in p for p in schema_problems(wrong_type))


def test_services_reach_their_pods(base: list[Obj]) -> None:
    renamed = mutated(base, edit("StatefulSet", "qdrant", lambda d: container(d)["ports"][0].update(name="rest")))
    assert any("qdrant:6333 targets 'http'" in p for p in service_problems(renamed))
    orphan = mutated(base, edit("Service", "connect", lambda d: d["spec"].update(selector={"app": "nothing"})))
    assert any("selects no workload" in p for p in service_problems(orphan))


def test_images_follow_docker_compose(base: list[Obj]) -> None:
    old = mutated(base, edit("StatefulSet", "kafka", lambda d: container(d).update(image="apache/kafka:4.0.0")))
    assert any("kafka runs apache/kafka:4.0.0" in p for p in image_problems(old))
    latest = mutated(base, edit("Deployment", "embedder", lambda d: container(d).update(image="ragtide:latest")))
    assert image_problems(latest)


def test_project_environment_is_real_settings_and_matches_compose(base: list[Obj], monkeypatch: MonkeyPatch) -> None:
    typo = mutated(base, set_env("Deployment", "embedder", "RAGTIDE_KAFKA__HOSTNAME", "kafka"))
    assert any("RAGTIDE_KAFKA__HOSTNAME" in p for p in env_problems(typo, monkeypatch))
    elsewhere = mutated(base, set_env("Deployment", "retriever", "RAGTIDE_POSTGRES__HOST", "db"))
    problems = env_problems(elsewhere, monkeypatch)
    assert any("db is not a Service" in p for p in problems)
    assert any("RAGTIDE_POSTGRES__HOST='db'" in p for p in problems)  # and it drifted from docker-compose.yml
    servers = "kafka-0.kafka:9092,kafka-1.kafka:9092,kafka-2.kafka:9094"
    port = mutated(base, set_env("Deployment", "retriever", "RAGTIDE_KAFKA__BOOTSTRAP_SERVERS", servers))
    problems = env_problems(port, monkeypatch)
    assert any("kafka-2.kafka: pod kafka-2 does not listen on 9094" in p for p in problems)
    assert any("retriever: kafka kafka-0.kafka:9092,kafka-1.kafka:9092,kafka-2.kafka:9094, not" in p for p in problems)
    servers = "kafka-0.kafka:9092,kafka-1.kafka:9092,kafka-3.kafka:9092"
    beyond = mutated(base, set_env("Deployment", "embedder", "RAGTIDE_KAFKA__BOOTSTRAP_SERVERS", servers))
    assert any("StatefulSet kafka has no pod kafka-3" in p for p in env_problems(beyond, monkeypatch))
    one = mutated(base, set_env("Deployment", "embedder", "RAGTIDE_KAFKA__BOOTSTRAP_SERVERS", "kafka-0.kafka:9092"))
    assert any("embedder: kafka kafka-0.kafka:9092, not every broker" in p for p in env_problems(one, monkeypatch))
    service = mutated(base, set_env("Deployment", "embedder", "RAGTIDE_KAFKA__BOOTSTRAP_SERVERS", "kafka:9094"))
    assert any("Service kafka has no port 9094" in p for p in env_problems(service, monkeypatch))


def test_the_sources_configmap_is_config_sources_yaml(base: list[Obj], monkeypatch: MonkeyPatch) -> None:
    assert (BASE / "sources.yaml").read_text() == (REPO_ROOT / "config" / "sources.yaml").read_text()
    assert (
        load_sources(BASE / "sources.yaml").user_tables
        == load_sources(REPO_ROOT / "config" / "sources.yaml").user_tables
    )
    moved = mutated(base, set_env("Deployment", "embedder", "RAGTIDE_SOURCES_FILE", "/etc/other/sources.yaml"))
    assert any("no ConfigMap is mounted at /etc/other" in p for p in env_problems(moved, monkeypatch))
    stale = mutated(
        base, edit("ConfigMap", "ragtide-sources", lambda d: d["data"].update({"sources.yaml": "sources: []"}))
    )
    assert any("is not config/sources.yaml" in p for p in env_problems(stale, monkeypatch))


def test_secrets_only_come_from_the_users_secret(base: list[Obj], monkeypatch: MonkeyPatch) -> None:
    literal = mutated(base, set_env("Deployment", "retriever", "RAGTIDE_POSTGRES__PASSWORD", "hunter2"))
    assert any("RAGTIDE_POSTGRES__PASSWORD must come from the Secret" in p for p in secret_problems(literal))
    in_config = mutated(
        base, edit("ConfigMap", "ragtide-env", lambda d: d["data"].update(RAGTIDE_GATEWAY__ADMIN_KEY="x"))
    )
    assert secret_problems(in_config)
    with pytest.raises(KeyError, match="admin-key"):
        container_env(base, container(find(base, "Deployment", "retriever")), secrets={"postgres-password": "x"})


def test_postgres_kafka_and_connect_run_as_compose_runs_them(base: list[Obj]) -> None:
    def replica(d: Obj) -> None:
        args = container(d)["args"]
        args[args.index("wal_level=logical")] = "wal_level=replica"

    assert any("postgres args" in p for p in stack_problems(mutated(base, edit("StatefulSet", "postgres", replica))))
    pgdata = mutated(base, set_env("StatefulSet", "postgres", "PGDATA", "/var/lib/postgresql/data"))
    assert any("PGDATA" in p for p in stack_problems(pgdata))
    partitions = mutated(base, set_env("StatefulSet", "kafka", "KAFKA_NUM_PARTITIONS", "3"))
    assert any(
        "kafka: the environment is not docker-compose.yml's: ['KAFKA_NUM_PARTITIONS']" in p
        for p in stack_problems(partitions)
    )
    routed = mutated(base, edit("Service", "kafka", lambda d: d["spec"].pop("publishNotReadyAddresses")))
    assert any("headless" in p for p in stack_problems(routed))
    fixed_host = mutated(base, set_env("Deployment", "connect", "ADVERTISED_HOST_NAME", "connect"))
    assert any("ADVERTISED_HOST_NAME" in p for p in stack_problems(fixed_host))
    one_broker = mutated(base, set_env("Deployment", "connect", "BOOTSTRAP_SERVERS", "kafka:9092"))
    assert any("['BOOTSTRAP_SERVERS'] differ" in p for p in stack_problems(one_broker))


def test_kafka_runs_compose_quorum_one_broker_per_pod(base: list[Obj]) -> None:
    assert kafka_problems(base) == []
    assert kafka_pods(base) == ["kafka-0.kafka", "kafka-1.kafka", "kafka-2.kafka"]
    c = container(find(base, "StatefulSet", "kafka"))
    env = container_env(base, c)
    assert kafka_pod_env(c, env, "kafka-2") == {
        "KAFKA_NODE_ID": "3",
        "KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT://kafka-2.kafka:9092",
    }

    def spec(**values: object) -> Callable[[list[Obj]], object]:
        return edit("StatefulSet", "kafka", lambda d: d["spec"].update(values))

    ordered = mutated(base, spec(podManagementPolicy="OrderedReady"))
    assert any("podManagementPolicy must be Parallel" in p for p in kafka_problems(ordered))
    default = mutated(base, edit("StatefulSet", "kafka", lambda d: d["spec"].pop("podManagementPolicy")))
    assert any("podManagementPolicy must be Parallel" in p for p in kafka_problems(default))  # OrderedReady
    one = mutated(base, spec(replicas=1))
    problems = kafka_problems(one)
    assert any("kafka: 1 replicas, docker-compose.yml runs 3 brokers" in p for p in problems)
    assert any("kafka: voters" in p for p in problems)  # the voters still name 3 pods
    for voters in (
        "1@kafka:9093",
        "1@kafka-0.kafka:9093,2@kafka-1.kafka:9093",
        "1@kafka-1.kafka:9093,2@kafka-0.kafka:9093,3@kafka-2.kafka:9093",
        "1@kafka-0.kafka:9094,2@kafka-1.kafka:9094,3@kafka-2.kafka:9094",
        "1@kafka-0:9093,2@kafka-1:9093,3@kafka-2:9093",
    ):
        wrong = mutated(base, set_env("StatefulSet", "kafka", "KAFKA_CONTROLLER_QUORUM_VOTERS", voters))
        assert any("kafka: voters" in p for p in kafka_problems(wrong)), voters
    static = mutated(base, set_env("StatefulSet", "kafka", "KAFKA_NODE_ID", "1"))
    assert any("['KAFKA_NODE_ID'] differ per pod" in p for p in kafka_problems(static))
    rf1 = mutated(base, set_env("StatefulSet", "kafka", "KAFKA_DEFAULT_REPLICATION_FACTOR", "1"))
    assert any("['KAFKA_DEFAULT_REPLICATION_FACTOR']" in p for p in kafka_problems(rf1))

    def script(text: str) -> Callable[[list[Obj]], object]:
        return edit("StatefulSet", "kafka", lambda d: container(d).update(args=[text]))

    run = "exec /etc/kafka/docker/run"
    node = "export KAFKA_NODE_ID=$(( ${HOSTNAME##*-} + 1 ))"
    advertised = "export KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://${HOSTNAME}.kafka:9092"
    assert kafka_problems(mutated(base, script(f"{node}\n{advertised}\n{run}\n"))) == []
    from_zero = "export KAFKA_NODE_ID=${HOSTNAME##*-}"
    assert any(
        "pod kafka-0 sets" in p for p in kafka_problems(mutated(base, script(f"{from_zero}\n{advertised}\n{run}")))
    )
    no_pod = "export KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://kafka:9092"
    assert any("pod kafka-1 sets" in p for p in kafka_problems(mutated(base, script(f"{node}\n{no_pod}\n{run}"))))
    unexported = "KAFKA_NODE_ID=$(( ${HOSTNAME##*-} + 1 ))"
    assert any("sets" in p for p in kafka_problems(mutated(base, script(f"{unexported}\n{advertised}\n{run}"))))
    assert any("ends in `exec" in p for p in kafka_problems(mutated(base, script(f"{node}\n{advertised}"))))
    assert any(
        "ends in `exec" in p
        for p in kafka_problems(mutated(base, script(f"{node}\n{advertised}\nexec kafka-server-start.sh")))
    )
    assert any("the wrapper fails" in p for p in kafka_problems(mutated(base, script(f"set -u\necho $NOPE\n{run}"))))
    plain = edit("StatefulSet", "kafka", lambda d: [container(d).pop("command"), container(d).pop("args")])
    assert any("must run `bash -c" in p for p in kafka_problems(mutated(base, plain)))
    shared = edit("StatefulSet", "kafka", lambda d: d["spec"].pop("volumeClaimTemplates"))
    assert any("a volume of its own" in p for p in kafka_problems(mutated(base, shared)))


def test_probes_ask_real_routes(base: list[Obj]) -> None:
    def probe(kind: str, path: str) -> Callable[[list[Obj]], object]:
        return edit("Deployment", "retriever", lambda d: container(d)[kind]["httpGet"].update(path=path))

    assert any(
        "/ready not" in p or "/ready," in p for p in probe_problems(mutated(base, probe("readinessProbe", "/ready")))
    )
    assert probe_problems(mutated(base, probe("readinessProbe", "/readyz")))  # the canary would gate traffic
    assert probe_problems(mutated(base, probe("livenessProbe", "/healthz?deep=true")))
    other_port = mutated(base, set_env("Deployment", "retriever", "RAGTIDE_API__PORT", "9000"))
    assert any("the API is on 9000" in p for p in probe_problems(other_port))
    no_liveness = edit("Deployment", "embedder", lambda d: container(d).pop("livenessProbe"))
    assert "embedder: livenessProbe must ask /healthz on port 8000" in probe_problems(mutated(base, no_liveness))
    wrong = edit("Deployment", "embedder", lambda d: container(d)["startupProbe"]["httpGet"].update(path="/metrics"))
    assert "embedder: startupProbe must ask /healthz on port 8000" in probe_problems(mutated(base, wrong))


def test_scale_out_follows_kafka(base: list[Obj]) -> None:
    assert scale_problems(mutated(base, edit("Deployment", "embedder", lambda d: d["spec"].update(replicas=7))))
    one_node = mutated(base, edit("StatefulSet", "qdrant", lambda d: d["spec"].update(replicas=1)))
    assert any("qdrant: 1 nodes" in p for p in scale_problems(one_node))
    rolling = mutated(base, edit("Deployment", "embedder", lambda d: d["spec"].pop("strategy")))
    assert any("Recreate" in p for p in scale_problems(rolling))
    one = mutated(base, edit("HorizontalPodAutoscaler", "retriever", lambda d: d["spec"].update(minReplicas=1)))
    assert scale_problems(one)
    two = mutated(base, edit("PodDisruptionBudget", "kafka", lambda d: d["spec"].update(maxUnavailable=2)))
    assert scale_problems(two) == ["kafka: needs a disruption budget of maxUnavailable 1 over its pods"]
    packed = mutated(base, edit("StatefulSet", "qdrant", lambda d: pod(d).pop("affinity")))
    assert scale_problems(packed) == ["qdrant: its pods must prefer different Kubernetes nodes (podAntiAffinity)"]


def test_project_pods_are_restricted(base: list[Obj]) -> None:
    assert dockerfile_uid() == 10001
    root = mutated(base, edit("Deployment", "retriever", lambda d: pod(d)["securityContext"].update(runAsUser=0)))
    assert any("retriever: must run as" in p for p in security_problems(root))
    caps = mutated(base, edit("Job", "connector-init", lambda d: container(d)["securityContext"].pop("capabilities")))
    assert any("connector-init" in p for p in security_problems(caps))


def test_the_gpu_overlay_puts_the_embedder_and_vllm_on_gpus(
    base: list[Obj], gpu: list[Obj], monkeypatch: MonkeyPatch
) -> None:
    def gpus(objs: list[Obj], kind: str, name: str) -> int:
        return int(container(find(objs, kind, name))["resources"].get("limits", {}).get("nvidia.com/gpu", 0))

    assert gpus(base, "Deployment", "embedder") == 0 and gpus(gpu, "Deployment", "embedder") == 1
    assert gpus(gpu, "Deployment", "vllm") == 1
    env = container_env(gpu, container(find(gpu, "Deployment", "embedder")))
    s = settings_from(env, monkeypatch)
    assert s.encoder.device == "cuda" and s.batch.events_per_batch(on_gpu=True) == 4096
    retriever = settings_from(container_env(gpu, container(find(gpu, "Deployment", "retriever"))), monkeypatch)
    assert retriever.encoder.device == "cpu"  # query embedding stays on the retriever's CPU
    url = urlsplit(str(retriever.generator.endpoint))
    assert service_port(gpu, url.hostname or "", url.port or 0) == []
    vllm = container(find(gpu, "Deployment", "vllm"))
    compose_vllm = command_words(load_compose()["services"]["vllm"])
    model = vllm["args"][vllm["args"].index("--model") + 1]
    assert model == interpolate(compose_vllm[compose_vllm.index("--model") + 1], {})  # compose's default model
    assert retriever.generator.model == model


def test_kubectl_dry_run_when_a_cluster_answers() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl")
    reach = subprocess.run([kubectl, "version", "--request-timeout=2s"], capture_output=True, text=True, check=False)
    if reach.returncode != 0:
        pytest.skip("no Kubernetes API server reachable (schema validated offline above)")
    for overlay in (BASE, GPU):
        done = subprocess.run(
            [kubectl, "apply", "--dry-run=server", "-k", str(overlay)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
