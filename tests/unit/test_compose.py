"""docker-compose.yml and the Dockerfile, checked against the native stack's own config.

No Docker engine runs here, so the compose file is parsed and compared with what `ragtide up` uses:
infra/maven/pom.xml (versions), infra/config/*.properties (Kafka and Connect), the settings classes (every
RAGTIDE_* variable) and ragtide.stack.postgres (server settings). Each check returns its problems, and a
mutated copy of the file proves that the check can fail.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from ragtide.cli import app as cli_app
from ragtide.contracts import templates
from ragtide.contracts.errors import ConfigError
from ragtide.contracts.settings import ClusterSettings, PostgresSettings, RagtideSettings
from ragtide.gateway.gateway import check_config
from ragtide.stack.cluster import Cluster, quorum_properties
from ragtide.stack.postgres import SERVER_SETTINGS
from tests.deploy import (
    COMPOSE_FILE,
    COMPOSE_GPU_FILE,
    DOCKERFILE,
    DOCKERIGNORE,
    PROJECT_SERVICES,
    REF,
    REQUIRED_REF,
    SECRET_NAME,
    SHELL_ENV,
    WILDCARD_HOSTS,
    Compose,
    command_words,
    environment,
    image_tag,
    listener_map,
    load_compose,
    mutated,
    parse_properties,
    pinned,
    pom_version,
    published_container_ports,
    raw_environment,
    settings_env_problems,
    settings_from,
)

pytestmark = pytest.mark.unit
MonkeyPatch = pytest.MonkeyPatch


# --- reading the files ------------------------------------------------------------------------------------


@pytest.fixture
def compose() -> Compose:
    return load_compose()


# --- the checks -------------------------------------------------------------------------------------------


def dependency_problems(doc: Compose) -> list[str]:
    """depends_on waits on a condition; what is waited for as healthy has a healthcheck."""
    services = doc["services"]
    problems = []
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            problems.append(f"{name}: depends_on is a list (no condition): {deps}")
            continue
        for dep, spec in deps.items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
                continue
            cond = (spec or {}).get("condition")
            target = services[dep]
            if cond == "service_healthy":
                test = (target.get("healthcheck") or {}).get("test")
                if not test or target["healthcheck"].get("disable") or test == ["NONE"]:
                    problems.append(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            elif cond == "service_completed_successfully":
                if target.get("restart") in ("always", "unless-stopped"):
                    problems.append(f"{name} waits for {dep} to complete, but {dep} restarts forever")
            else:
                problems.append(f"{name}: depends_on {dep} is {cond}, not healthy / completed_successfully")
            if target.get("profiles") and not svc.get("profiles"):
                problems.append(f"{name} (no profile) depends on {dep}, only in {target['profiles']}")
        brokers = broker_services(doc)
        waits = {d for d, spec in deps.items() if (spec or {}).get("condition") == "service_healthy"}
        if set(deps) & set(brokers) and not set(brokers) <= waits:
            problems.append(f"{name} waits for {sorted(set(deps) & set(brokers))}, not the whole quorum {brokers}")
    return problems


def version_problems(doc: Compose) -> list[str]:
    """Images carry the versions the native stack resolves (pom.xml, constraints.txt, PostgreSQL 15)."""
    problems = []
    kafka, debezium = pom_version("kafka.version"), pom_version("debezium.version")
    for broker in ["kafka", *broker_services(doc)[1:]]:
        repo, tag = image_tag(doc, broker)
        if repo != "apache/kafka" or not re.fullmatch(r"\d+\.\d+\.\d+", tag) or tag != kafka:
            problems.append(f"{broker} image {repo}:{tag}, pom.xml has kafka.version {kafka}")
    repo, tag = image_tag(doc, "connect")
    if repo != "quay.io/debezium/connect" or tag != debezium:
        problems.append(f"connect image {repo}:{tag}, pom.xml has debezium.version {debezium}")
    repo, tag = image_tag(doc, "postgres")
    native_major = PostgresSettings().bin_dir.parent.name  # /usr/lib/postgresql/<major>/bin
    if repo != "postgres" or tag.split(".")[0].split("-")[0] != "15" or native_major != "15":
        problems.append(f"postgres image {repo}:{tag}, the native stack runs PostgreSQL {native_major}")
    repo, tag = image_tag(doc, "qdrant")
    server = tag.removeprefix("v").split(".")
    client = pinned("qdrant-client").split(".")
    if repo != "qdrant/qdrant" or server[0] != client[0] or abs(int(server[1]) - int(client[1])) > 1:
        problems.append(f"qdrant image {tag} is not within one minor of qdrant-client {'.'.join(client)}")
    return problems


def secret_problems(doc: Compose) -> list[str]:
    """A secret is never written into the file nor given a default: `${VAR:?message}` or passed through."""
    problems = []
    for name, svc in doc["services"].items():
        for key, value in raw_environment(svc).items():
            if SECRET_NAME.search(key) and value is not None and not REQUIRED_REF.fullmatch(value):
                problems.append(f"{name}: {key} must be ${{VAR:?message}} (or passed through), not {value!r}")
    text = yaml.safe_dump(doc, width=1 << 20)  # no folded lines: every ${...} stays whole
    for m in REF.finditer(text):
        name = m["name"] or m["bare"]
        if name and SECRET_NAME.search(name) and m["op"] != ":?":
            problems.append(f"${{{name}...}} must use the ${{{name}:?message}} form: {m.group(0)}")
    return problems


def postgres_problems(doc: Compose) -> list[str]:
    """postgres runs with the native server settings, and its database/user are the ones the services use."""
    problems = []
    svc = doc["services"]["postgres"]
    words = command_words(svc)
    if not words or words[0] != "postgres":
        problems.append(f"postgres command must start the server: {words}")
    given = dict(w.split("=", 1) for flag, w in itertools.pairwise(words) if flag == "-c" and "=" in w)
    for key, value in SERVER_SETTINGS.items():
        if given.get(key) != value:
            problems.append(f"postgres: -c {key}={value} (ragtide.stack.postgres), compose: {given.get(key)}")
    env = environment(doc, "postgres")
    default = PostgresSettings()
    for service in PROJECT_SERVICES:
        svc_env = environment(doc, service)
        if env.get("POSTGRES_DB") != svc_env.get("RAGTIDE_POSTGRES__DATABASE", default.database):
            problems.append(f"{service}: RAGTIDE_POSTGRES__DATABASE is not postgres' POSTGRES_DB")
        if env.get("POSTGRES_USER", "postgres") != svc_env.get("RAGTIDE_POSTGRES__USER", default.user):
            problems.append(f"{service}: RAGTIDE_POSTGRES__USER is not postgres' POSTGRES_USER")
        if env.get("POSTGRES_PASSWORD") != svc_env.get("RAGTIDE_POSTGRES__PASSWORD"):
            problems.append(f"{service}: RAGTIDE_POSTGRES__PASSWORD is not postgres' POSTGRES_PASSWORD")
    return problems


# Kafka's image (apache/kafka): defaults of docker/resources/common-scripts/configureDefaults, and the
# variables its property renderer skips.
_PROTOCOLS = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PLAINTEXT_HOST:PLAINTEXT"
_LISTENERS = "PLAINTEXT://localhost:29092,CONTROLLER://localhost:29093,PLAINTEXT_HOST://0.0.0.0:9092"
KAFKA_IMAGE_DEFAULTS = {
    "KAFKA_NODE_ID": "1",
    "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": _PROTOCOLS,
    "KAFKA_LISTENERS": _LISTENERS,
    "KAFKA_ADVERTISED_LISTENERS": "PLAINTEXT://localhost:29092,PLAINTEXT_HOST://localhost:9092",
    "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
    "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
    "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
    "KAFKA_PROCESS_ROLES": "broker,controller",
    "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:29093",
    "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
    "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
    "KAFKA_LOG_DIRS": "/tmp/kraft-combined-logs",
}
KAFKA_NOT_PROPERTIES = {
    "KAFKA_VERSION",
    "KAFKA_HEAP_OPT",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_OPTS",
    "KAFKA_JMX_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_GC_LOG_OPTS",
    "KAFKA_LOG4J_ROOT_LOGLEVEL",
    "KAFKA_LOG4J_LOGGERS",
    "KAFKA_TOOLS_LOG4J_LOGLEVEL",
}


def kafka_env_key(name: str) -> str:
    """The image's env -> property rule: _ -> ., __ -> _, ___ -> -, lower case."""
    name = re.sub(r"(?<=[^_])_(?=[^_])", ".", name)
    return name.replace("___", "-").replace("__", "_").lower()


def kafka_properties(env: Mapping[str, str]) -> dict[str, str]:
    effective = {**KAFKA_IMAGE_DEFAULTS, **env}
    return {
        kafka_env_key(k.removeprefix("KAFKA_")): v
        for k, v in effective.items()
        if k.startswith("KAFKA_") and k not in KAFKA_NOT_PROPERTIES
    }


def volume_targets(svc: Mapping[str, Any]) -> set[str]:
    targets = set()
    for v in svc.get("volumes") or []:
        targets.add(v["target"] if isinstance(v, dict) else str(v).split(":")[1])
    return targets


def listener_problems(what: str, native: str, compose: str) -> list[str]:
    """Same listener names and ports; compose may bind every interface instead of one host."""
    n, c = listener_map(native), listener_map(compose)
    if {k: p for k, (_, p) in n.items()} != {k: p for k, (_, p) in c.items()}:
        return [f"{what}: {compose!r} does not listen like the native {native!r}"]
    allowed = {name: {*WILDCARD_HOSTS, host} for name, (host, _) in n.items()}
    return [f"{what}: {name} binds {host!r}" for name, (host, _) in c.items() if host not in allowed[name]]


def broker_services(doc: Compose) -> list[str]:
    """The Kafka brokers: every service of Kafka's image, in the file's order (node id i+1 is the i-th)."""
    return [name for name in doc["services"] if image_tag(doc, name)[0] == "apache/kafka"]


def server_list(value: str) -> list[tuple[str, int]]:
    """`a:9092,b:9092` -> [("a", 9092), ("b", 9092)] (a bootstrap.servers value)."""
    return [(host, int(port)) for host, _, port in (s.strip().rpartition(":") for s in value.split(",") if s)]


def broker_problems(doc: Compose, name: str, native: Mapping[str, str]) -> list[str]:
    """One broker's effective properties equal `native`, its log dir on a volume."""
    props = kafka_properties(environment(doc, name))
    extra = sorted(set(props) - set(native))
    problems = [f"{name}: {k} is set in compose, not in server.properties + quorum_properties" for k in extra]
    for key, value in native.items():
        if key not in props:
            problems.append(f"{name}: server.properties + quorum_properties set {key}={value}, compose does not")
        elif key == "listeners":
            problems += listener_problems(f"{name} listeners", value, props[key])
        elif props[key] != value:
            problems.append(f"{name}: {key}={props[key]!r}, server.properties + quorum_properties have {value!r}")
    if props.get("log.dirs") not in volume_targets(doc["services"][name]):
        problems.append(f"{name}: log.dirs {props.get('log.dirs')} is not on a volume")
    return problems


def kafka_problems(doc: Compose, settings: RagtideSettings) -> list[str]:
    """The brokers are the quorum `ragtide up --cluster` runs (`cluster.brokers` of them): each one's effective
    properties equal infra/config/server.properties rendered for its service, plus `quorum_properties` for its
    node id and the voters that the broker services and their CONTROLLER listeners make; one CLUSTER_ID; a volume
    each; the project's and Connect's bootstrap servers are every broker."""
    brokers = broker_services(doc)
    n, native_n = len(brokers), ClusterSettings().brokers
    problems = []
    if n != native_n or brokers[:1] != ["kafka"]:
        problems.append(f"kafka: brokers {brokers}; `ragtide up --cluster` runs {native_n}, the first named kafka")
    props = {b: kafka_properties(environment(doc, b)) for b in brokers}
    controllers = {b: listener_map(p.get("listeners", "")).get("CONTROLLER") for b, p in props.items()}
    ports = {b: c[1] for b, c in controllers.items() if c is not None}
    if len(ports) != n:
        return problems + [f"{b}: no CONTROLLER listener" for b in brokers if b not in ports]
    voters = [f"{i + 1}@{b}:{ports[b]}" for i, b in enumerate(brokers)]
    servers = dict(server_list(settings.kafka.bootstrap))
    if sorted(h for h, _ in server_list(settings.kafka.bootstrap)) != sorted(brokers):
        problems.append(f"kafka: the project's bootstrap servers {settings.kafka.bootstrap} are not every broker")
    connect, _ = connect_properties(environment(doc, "connect"))
    if sorted(h for h, _ in server_list(connect.get("bootstrap.servers", ""))) != sorted(brokers):
        problems.append(f"kafka: Connect's bootstrap.servers {connect.get('bootstrap.servers')} is not every broker")
    for i, name in enumerate(brokers):
        native = parse_properties(
            templates.render(
                "server.properties",
                {
                    "KAFKA_HOST": name,
                    "KAFKA_PORT": str(servers.get(name, settings.kafka.port)),
                    "KAFKA_CONTROLLER_PORT": str(ports[name]),
                    "KAFKA_DATA": props[name].get("log.dirs", ""),
                    "KAFKA_PARTITIONS": str(settings.kafka.partitions),
                },
            )
        )
        problems += broker_problems(doc, name, {**native, **quorum_properties(i + 1, voters, n)})
    ids = sorted(p.get("node.id", "") for p in props.values())
    if ids != sorted(str(i) for i in range(1, n + 1)):
        problems.append(f"kafka: node ids {ids} are not 1..{n}, one each")
    cluster_ids = {environment(doc, b).get("CLUSTER_ID") for b in brokers}
    if len(cluster_ids) != 1 or None in cluster_ids:
        problems.append("kafka: CLUSTER_ID must be one fixed id on every broker (storage is formatted with it)")
    sources = [
        str(v["source"] if isinstance(v, dict) else str(v).split(":")[0])
        for b in brokers
        for v in doc["services"][b].get("volumes") or []
        if (v["target"] if isinstance(v, dict) else str(v).split(":")[1]) == props[b].get("log.dirs")
    ]
    if len(set(sources)) != len(sources):
        problems.append(f"kafka: brokers share a log volume: {sources}")
    return problems


# Debezium's Connect image (connect-base/docker-entrypoint.sh): its own variables, their defaults, and the
# property each one sets (overwriting a CONNECT_* variable for the same property).
CONNECT_IMAGE_VARS = {
    "BOOTSTRAP_SERVERS": "bootstrap.servers",
    "GROUP_ID": "group.id",
    "CONFIG_STORAGE_TOPIC": "config.storage.topic",
    "OFFSET_STORAGE_TOPIC": "offset.storage.topic",
    "STATUS_STORAGE_TOPIC": "status.storage.topic",
    "KEY_CONVERTER": "key.converter",
    "VALUE_CONVERTER": "value.converter",
    "OFFSET_FLUSH_INTERVAL_MS": "offset.flush.interval.ms",
    "OFFSET_FLUSH_TIMEOUT_MS": "offset.flush.timeout.ms",
    "SHUTDOWN_TIMEOUT": "task.shutdown.graceful.timeout.ms",
    "REST_PORT": "rest.port",
    "REST_HOST_NAME": "rest.host.name",
    "ADVERTISED_PORT": "rest.advertised.port",
    "ADVERTISED_HOST_NAME": "rest.advertised.host.name",
}
CONNECT_IMAGE_DEFAULTS = {
    "REST_PORT": "8083",
    "ADVERTISED_PORT": "8083",
    "REST_HOST_NAME": "<container ip>",
    "ADVERTISED_HOST_NAME": "<container ip>",
    "GROUP_ID": "1",
    "OFFSET_FLUSH_INTERVAL_MS": "60000",
    "OFFSET_FLUSH_TIMEOUT_MS": "5000",
    "SHUTDOWN_TIMEOUT": "10000",
    "KEY_CONVERTER": "org.apache.kafka.connect.json.JsonConverter",
    "VALUE_CONVERTER": "org.apache.kafka.connect.json.JsonConverter",
}
# Set by the image whatever we do; not in our properties file.
CONNECT_IMAGE_ONLY = {
    "rest.port",
    "rest.host.name",
    "offset.flush.timeout.ms",
    "task.shutdown.graceful.timeout.ms",
}


def connect_properties(env: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The worker's properties from the container environment; CONNECT_* variables the image overwrites."""
    props, shadowed = {}, []
    for key, value in env.items():
        if key.startswith("CONNECT_"):
            prop = key.removeprefix("CONNECT_").lower().replace("_", ".")
            if prop in CONNECT_IMAGE_VARS.values():
                own = next(k for k, p in CONNECT_IMAGE_VARS.items() if p == prop)
                shadowed.append(f"connect: the image overwrites {key}; set {own} instead")
            props[prop] = value
    effective = {**CONNECT_IMAGE_DEFAULTS, **env}
    for var, prop in CONNECT_IMAGE_VARS.items():
        if var in effective:
            props[prop] = effective[var]
    return props, shadowed


def connect_problems(doc: Compose, settings: RagtideSettings) -> list[str]:
    """The worker's effective properties equal infra/config/connect-distributed.properties here."""
    props, problems = connect_properties(environment(doc, "connect"))
    native = parse_properties(
        templates.render(
            "connect-distributed.properties",
            {
                "KAFKA_BOOTSTRAP": settings.kafka.bootstrap,
                "CONNECT_HOST": settings.connect.host,
                "CONNECT_PORT": str(settings.connect.port),
                "PLUGIN_PATH": "(the image's)",
                "REPLICATION_FACTOR": str(settings.kafka.replication),
            },
        )
    )
    native.pop("plugin.path")  # the image puts the Debezium plugins on its own plugin.path
    extra = sorted(set(props) - set(native) - CONNECT_IMAGE_ONLY)
    problems += [f"connect: {k} is set in compose, not in connect-distributed.properties" for k in extra]
    for key, value in native.items():
        if key not in props:
            problems.append(f"connect: connect-distributed.properties sets {key}={value}, compose does not")
        elif key == "listeners":
            problems += listener_problems("connect listeners", value, props[key])
        elif props[key] != value:
            problems.append(f"connect: {key}={props[key]!r}, connect-distributed.properties has {value!r}")
    return problems


def wiring_problems(doc: Compose, settings: RagtideSettings, service: str) -> list[str]:
    """A project service's settings point at the compose services, on the ports those listen on."""
    services = doc["services"]
    problems = []
    if settings.kafka.managed:
        problems.append(f"{service}: no RAGTIDE_KAFKA__BOOTSTRAP_SERVERS: it would expect a local broker")
    advertised = [
        listener_map(kafka_properties(environment(doc, b)).get("advertised.listeners", "")).get("PLAINTEXT")
        for b in broker_services(doc)
    ]
    servers = server_list(settings.kafka.bootstrap)
    for server in servers:
        if server not in advertised:
            problems.append(f"{service}: kafka {server} is not a broker's advertised listener {advertised}")
    connect, _ = connect_properties(environment(doc, "connect"))
    if settings.kafka.bootstrap != connect.get("bootstrap.servers"):
        problems.append(f"{service}: kafka {settings.kafka.bootstrap} is not Connect's bootstrap.servers")
    connect_port = urlsplit(connect.get("listeners", "")).port
    if settings.connect.host != "connect" or settings.connect.port != connect_port:
        problems.append(f"{service}: Connect at {settings.connect.url}, connect listens on {connect_port}")
    pg = settings.postgres
    if (pg.host, pg.port) != ("postgres", 5432):
        problems.append(f"{service}: postgres at {pg.host}:{pg.port}, not postgres:5432")
    urls = [urlsplit(u) for u in (settings.qdrant_url or "").split(",")]
    nodes = sorted(name for name in services if name == "qdrant" or name.startswith("qdrant-"))
    if sorted(u.hostname or "" for u in urls) != nodes or any(u.port != 6333 for u in urls):
        problems.append(f"{service}: QDRANT_URL {settings.qdrant_url!r} is not every Qdrant node on 6333 ({nodes})")
    hosts = [settings.postgres.host, *(h for h, _ in servers), settings.connect.host, *(u.hostname for u in urls)]
    for host in hosts:
        if host not in services:
            problems.append(f"{service}: {host} is not a service")
    return problems


def retriever_port_problems(doc: Compose) -> list[str]:
    svc = doc["services"]["retriever"]
    port = int(environment(doc, "retriever")["RAGTIDE_API__PORT"])
    problems = []
    if published_container_ports(svc) != [port]:
        problems.append(f"retriever publishes {svc.get('ports')}, its API is on {port} (RAGTIDE_API__PORT)")
    test = " ".join(map(str, (svc.get("healthcheck") or {}).get("test") or []))
    if f":{port}/readyz" not in test:
        problems.append(f"retriever healthcheck must ask /readyz on port {port}: {test}")
    return problems


# --- the tests --------------------------------------------------------------------------------------------


def set_env(service: str, **values: str) -> Callable[[Compose], object]:
    return lambda d: d["services"][service]["environment"].update(values)


def drop_env(service: str, key: str) -> Callable[[Compose], object]:
    return lambda d: d["services"][service]["environment"].pop(key)


def set_key(service: str, **values: object) -> Callable[[Compose], object]:
    return lambda d: d["services"][service].update(values)


def test_the_topology_is_complete(compose: Compose) -> None:
    nodes = ["qdrant", "qdrant-2", "qdrant-3"]
    brokers = ["kafka", "kafka-2", "kafka-3"]
    expected = {"postgres", *brokers, "connect", "connector-init", *nodes, "embedder", "retriever", "vllm"}
    assert set(compose["services"]) == expected
    # The Kafka quorum as `ragtide up --cluster` runs it: as many brokers, started side by side.
    assert broker_services(compose) == brokers and len(brokers) == ClusterSettings().brokers
    assert all(not compose["services"][b].get("depends_on") for b in brokers)
    # A Qdrant cluster as `ragtide up --cluster` runs it: node 1 founds it, the others bootstrap from it.
    for i, name in enumerate(nodes):
        svc = compose["services"][name]
        assert svc["image"] == compose["services"]["qdrant"]["image"]
        assert svc["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        bootstrap = [] if i == 0 else ["--bootstrap", "http://qdrant:6335"]
        assert command_words(svc) == ["./entrypoint.sh", *bootstrap, "--uri", f"http://{name}:6335"]
    assert compose["services"]["embedder"]["deploy"]["replicas"] >= 2
    image = compose["services"]["retriever"]["image"]
    for name in PROJECT_SERVICES:
        svc = compose["services"][name]
        assert svc["build"]["dockerfile"] == "Dockerfile" and svc["image"] == image
    assert command_words(compose["services"]["embedder"]) == ["ragtide", "embedder"]
    assert command_words(compose["services"]["retriever"]) == ["ragtide", "retriever"]
    assert "ragtide register-connector" in " ".join(command_words(compose["services"]["connector-init"]))
    cli = set(typer.main.get_command(cli_app).commands)  # type: ignore[attr-defined]
    assert {"embedder", "retriever", "register-connector"} <= cli


def test_depends_on_waits_for_health(compose: Compose) -> None:
    assert dependency_problems(compose) == []
    no_healthcheck = mutated(compose, lambda d: d["services"]["kafka"].pop("healthcheck"))
    assert any("kafka has no healthcheck" in p for p in dependency_problems(no_healthcheck))
    no_condition = mutated(compose, set_key("embedder", depends_on=["kafka"]))
    assert any("no condition" in p for p in dependency_problems(no_condition))
    started = mutated(compose, set_key("embedder", depends_on={"kafka": {"condition": "service_started"}}))
    assert any("service_started" in p for p in dependency_problems(started))
    gpu = mutated(compose, lambda d: d["services"]["retriever"]["depends_on"].update(vllm={}))
    assert any("only in" in p for p in dependency_problems(gpu))
    # Waiting for Kafka is waiting for the quorum: every broker healthy, not just the first.
    one_broker = mutated(compose, set_key("connect", depends_on={"kafka": {"condition": "service_healthy"}}))
    assert any("connect waits for ['kafka'], not the whole quorum" in p for p in dependency_problems(one_broker))
    two = mutated(compose, lambda d: d["services"]["embedder"]["depends_on"].pop("kafka-3"))
    assert any("embedder waits for" in p for p in dependency_problems(two))


def test_images_follow_the_native_stack_versions(compose: Compose) -> None:
    assert version_problems(compose) == []
    for service, image in [
        ("kafka", "apache/kafka:4.1.0"),
        ("kafka", "apache/kafka:4.1"),
        ("kafka-3", "apache/kafka:4.0.0"),
        ("connect", "quay.io/debezium/connect:3.4.2.Final"),
        ("connect", "debezium/connect:3.4.3.Final"),
        ("postgres", "postgres:16"),
        ("qdrant", "qdrant/qdrant:v1.16.3"),
    ]:
        assert version_problems(mutated(compose, set_key(service, image=image))), image


@pytest.mark.parametrize("service", PROJECT_SERVICES)
def test_ragtide_env_names_real_settings(compose: Compose, service: str, monkeypatch: MonkeyPatch) -> None:
    env = environment(compose, service)
    assert settings_env_problems(env) == []
    s = settings_from(env, monkeypatch)
    assert s.postgres.password.get_secret_value() == SHELL_ENV["POSTGRES_PASSWORD"]
    assert wiring_problems(compose, s, service) == []
    check_config(s)  # prod mode with a real admin key: the API may listen on every interface
    assert s.gateway.mode == "prod" and s.generator.endpoint == "http://vllm:8000/v1"


def test_the_gateway_refuses_compose_without_a_real_admin_key(compose: Compose, monkeypatch: MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="RAGTIDE_ADMIN_KEY"):
        environment(compose, "retriever", shell={"POSTGRES_PASSWORD": "x"})
    weak = {**SHELL_ENV, "RAGTIDE_ADMIN_KEY": "change-me"}
    with pytest.raises(ConfigError, match=r"gateway\.admin_key"):
        check_config(settings_from(environment(compose, "retriever", shell=weak), monkeypatch))
    dev = mutated(compose, set_env("retriever", RAGTIDE_GATEWAY__MODE="dev"))
    with pytest.raises(ConfigError, match=r"gateway\.mode"):
        check_config(settings_from(environment(dev, "retriever"), monkeypatch))


def test_unknown_ragtide_env_fails(compose: Compose, monkeypatch: MonkeyPatch) -> None:
    for bad in ("RAGTIDE_POSTGRES__HOST_NAME", "RAGTIDE_COLOUR", "RAGTIDE_KAFKA__HOST__X", "RAGTIDE_LOG__X"):
        wrong = mutated(compose, set_env("embedder", **{bad: "1"}))
        assert settings_env_problems(environment(wrong, "embedder")), bad
    # pydantic alone lets a top-level typo through (extra="ignore"): hence the name check above
    assert settings_from({"RAGTIDE_COLOUR": "1"}, monkeypatch).log_level == "INFO"
    with pytest.raises(ConfigError, match=r"api\.portt"):
        settings_from({**environment(compose, "retriever"), "RAGTIDE_API__PORTT": "8000"}, monkeypatch)
    bad_value = mutated(compose, set_env("retriever", RAGTIDE_API__PORT="http"))
    with pytest.raises(ConfigError, match=r"api\.port"):
        settings_from(environment(bad_value, "retriever"), monkeypatch)
    elsewhere = mutated(compose, set_env("retriever", RAGTIDE_POSTGRES__HOST="db"))
    s = settings_from(environment(elsewhere, "retriever"), monkeypatch)
    assert any("not a service" in p for p in wiring_problems(elsewhere, s, "retriever"))


def test_postgres_runs_with_the_native_server_settings(compose: Compose) -> None:
    assert SERVER_SETTINGS["wal_level"] == "logical"
    assert postgres_problems(compose) == []

    def replica(d: Compose) -> None:
        cmd = d["services"]["postgres"]["command"]
        cmd[cmd.index("wal_level=logical")] = "wal_level=replica"

    assert any("wal_level" in p for p in postgres_problems(mutated(compose, replica)))
    assert postgres_problems(mutated(compose, set_env("postgres", POSTGRES_DB="other")))
    as_string = mutated(compose, set_key("postgres", command="postgres -c wal_level=logical"))
    assert any("max_slot_wal_keep_size" in p for p in postgres_problems(as_string))


def test_secrets_are_required_never_defaulted(compose: Compose) -> None:
    assert secret_problems(compose) == []
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        environment(compose, "postgres", shell={})
    for value in ("${POSTGRES_PASSWORD:-postgres}", "${POSTGRES_PASSWORD}", "hunter2"):
        wrong = mutated(compose, set_env("postgres", POSTGRES_PASSWORD=value))
        assert secret_problems(wrong), value
    in_command = mutated(compose, set_key("connect", command="echo ${DB_PASSWORD-x}"))
    assert secret_problems(in_command)


def test_retriever_publishes_its_api_port(compose: Compose) -> None:
    assert retriever_port_problems(compose) == []
    assert published_container_ports({"ports": ["127.0.0.1:8080:8000/tcp", {"target": 9}]}) == [8000, 9]
    assert retriever_port_problems(mutated(compose, set_key("retriever", ports=["8000:8080"])))
    assert retriever_port_problems(mutated(compose, set_env("retriever", RAGTIDE_API__PORT="9000")))


def test_kafka_matches_server_properties(compose: Compose, monkeypatch: MonkeyPatch) -> None:
    assert kafka_env_key("OFFSETS_TOPIC_REPLICATION_FACTOR") == "offsets.topic.replication.factor"
    assert kafka_env_key("A__B___C_D") == "a_b-c.d"
    s = settings_from(environment(compose, "embedder"), monkeypatch)
    assert kafka_problems(compose, s) == []
    partitions = mutated(compose, set_env("kafka", KAFKA_NUM_PARTITIONS="3"))
    assert any("num.partitions" in p for p in kafka_problems(partitions, s))
    missing = mutated(compose, drop_env("kafka", "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR"))
    assert any("share.coordinator.state.topic.min.isr" in p for p in kafka_problems(missing, s))
    voters = mutated(compose, set_env("kafka", KAFKA_CONTROLLER_QUORUM_VOTERS="1@kafka:9094"))
    assert any("controller.quorum.voters" in p for p in kafka_problems(voters, s))
    assert kafka_problems(mutated(compose, drop_env("kafka", "KAFKA_LISTENERS")), s)
    extra = mutated(compose, set_env("kafka", KAFKA_AUTO_LEADER_REBALANCE_ENABLE="false"))
    assert any("auto.leader.rebalance.enable" in p for p in kafka_problems(extra, s))


def test_kafka_is_the_native_clusters_quorum(compose: Compose, monkeypatch: MonkeyPatch) -> None:
    s = settings_from(environment(compose, "embedder"), monkeypatch)
    assert not s.kafka.managed and s.kafka.replication == 3  # no local broker; topics replicated 3 times
    # The native cluster's brokers add exactly quorum_properties (the function these checks expect).
    cluster = Cluster(RagtideSettings())
    n = cluster.c.brokers
    voters = [f"{j + 1}@127.0.0.1:{cluster.port('broker', j) + 1}" for j in range(n)]
    assert [cluster.broker(i).extra for i in range(n)] == [quorum_properties(i + 1, voters, n) for i in range(n)]
    assert quorum_properties(2, ["1@a:1", "2@b:1"], 2)["min.insync.replicas"] == "2"
    assert quorum_properties(1, "1@a:1", 1)["default.replication.factor"] == "1"
    assert kafka_problems(compose, s) == []

    def problems_of(change: Callable[[Compose], object]) -> list[str]:
        return kafka_problems(mutated(compose, change), s)

    assert any("kafka-2: node.id='1'" in p for p in problems_of(set_env("kafka-2", KAFKA_NODE_ID="1")))
    assert any("node ids ['1', '1', '3']" in p for p in problems_of(set_env("kafka-2", KAFKA_NODE_ID="1")))
    swapped = set_env("kafka", KAFKA_CONTROLLER_QUORUM_VOTERS="1@kafka-2:9093,2@kafka:9093,3@kafka-3:9093")
    assert any("kafka: controller.quorum.voters" in p for p in problems_of(swapped))
    two_voters = set_env("kafka-3", KAFKA_CONTROLLER_QUORUM_VOTERS="1@kafka:9093,2@kafka-2:9093")
    assert any("kafka-3: controller.quorum.voters" in p for p in problems_of(two_voters))
    rf1 = set_env("kafka-3", KAFKA_DEFAULT_REPLICATION_FACTOR="1")
    assert any("kafka-3: default.replication.factor='1'" in p for p in problems_of(rf1))
    isr1 = set_env("kafka-2", KAFKA_MIN_INSYNC_REPLICAS="1")
    assert any("kafka-2: min.insync.replicas='1'" in p for p in problems_of(isr1))
    offsets = set_env("kafka", KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1")
    assert any("kafka: offsets.topic.replication.factor" in p for p in problems_of(offsets))
    advertised = set_env("kafka-2", KAFKA_ADVERTISED_LISTENERS="PLAINTEXT://kafka:9092")
    assert any("kafka-2: advertised.listeners" in p for p in problems_of(advertised))
    assert any("CLUSTER_ID" in p for p in problems_of(set_env("kafka-3", CLUSTER_ID="another-cluster-id")))
    assert any("CLUSTER_ID" in p for p in problems_of(drop_env("kafka-2", "CLUSTER_ID")))
    shared = set_key("kafka-3", volumes=["kafka-data:/var/lib/kafka/data"])
    assert any("share a log volume" in p for p in problems_of(shared))
    assert any("kafka-2: log.dirs" in p for p in problems_of(lambda d: d["services"]["kafka-2"].pop("volumes")))
    assert any("`ragtide up --cluster` runs 3" in p for p in problems_of(lambda d: d["services"].pop("kafka-3")))

    def renamed(d: Compose) -> None:
        d["services"]["broker"] = d["services"].pop("kafka")

    assert any("the first named kafka" in p for p in problems_of(renamed))
    connect = set_env("connect", BOOTSTRAP_SERVERS="kafka:9092,kafka-2:9092")
    assert any("Connect's bootstrap.servers" in p for p in problems_of(connect))
    # The project's bootstrap servers: every broker, each at its advertised listener.
    partial = {**environment(compose, "embedder"), "RAGTIDE_KAFKA__BOOTSTRAP_SERVERS": "kafka:9092,kafka-2:9092"}
    p2 = settings_from(partial, monkeypatch)
    assert any("the project's bootstrap servers" in p for p in kafka_problems(compose, p2))
    local = {k: v for k, v in environment(compose, "embedder").items() if k != "RAGTIDE_KAFKA__BOOTSTRAP_SERVERS"}
    assert any("expect a local broker" in p for p in wiring_problems(compose, settings_from(local, monkeypatch), "x"))
    wrong_port = {**partial, "RAGTIDE_KAFKA__BOOTSTRAP_SERVERS": "kafka:9092,kafka-2:9092,kafka-3:9094"}
    problems = wiring_problems(compose, settings_from(wrong_port, monkeypatch), "embedder")
    assert any("('kafka-3', 9094) is not a broker's advertised listener" in p for p in problems)


def test_connect_matches_connect_distributed_properties(compose: Compose, monkeypatch: MonkeyPatch) -> None:
    s = settings_from(environment(compose, "connector-init"), monkeypatch)
    assert connect_problems(compose, s) == []
    shadowed = mutated(compose, drop_env("connect", "OFFSET_FLUSH_INTERVAL_MS"))
    shadowed["services"]["connect"]["environment"]["CONNECT_OFFSET_FLUSH_INTERVAL_MS"] = "1000"
    problems = connect_problems(shadowed, s)
    assert any("overwrites CONNECT_OFFSET_FLUSH_INTERVAL_MS" in p for p in problems)
    assert any("offset.flush.interval.ms='60000'" in p for p in problems)
    no_override = mutated(compose, drop_env("connect", "CONNECT_CONNECTOR_CLIENT_CONFIG_OVERRIDE_POLICY"))
    assert any("connector.client.config.override.policy" in p for p in connect_problems(no_override, s))
    no_host = mutated(compose, drop_env("connect", "ADVERTISED_HOST_NAME"))
    assert any("rest.advertised.host.name" in p for p in connect_problems(no_host, s))


def test_vllm_runs_only_with_the_gpu_profile(compose: Compose) -> None:
    vllm = compose["services"]["vllm"]
    assert vllm["profiles"] == ["gpu"] and vllm["image"].startswith("vllm/vllm-openai:")
    assert "--model" in command_words(vllm)
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert all(not s.get("profiles") for n, s in compose["services"].items() if n != "vllm")


def gpu_devices(svc: Compose) -> list[Any]:
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def test_the_gpu_file_puts_only_the_embedder_on_a_gpu(monkeypatch: MonkeyPatch) -> None:
    plain, merged = load_compose(), load_compose(gpu=True)
    assert gpu_devices(plain["services"]["embedder"]) == []
    assert len(gpu_devices(merged["services"]["embedder"])) == 1
    embedder = settings_from(environment(merged, "embedder"), monkeypatch)
    assert embedder.encoder.device == "cuda" and embedder.batch.events_per_batch(on_gpu=True) == 4096
    for name in ("retriever", "connector-init"):  # no device there, so nothing may ask for CUDA
        assert settings_from(environment(merged, name), monkeypatch).encoder.device == "cpu"
        assert gpu_devices(merged["services"][name]) == []
    assert settings_from(environment(plain, "embedder"), monkeypatch).encoder.device == "cpu"
    # everything else holds for the merged file too
    s = settings_from(environment(merged, "embedder"), monkeypatch)
    assert dependency_problems(merged) == [] and secret_problems(merged) == [] and version_problems(merged) == []
    assert wiring_problems(merged, s, "embedder") == []
    assert set(merged["services"]) == set(plain["services"])  # it only changes the embedder


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_project_image() -> None:
    steps = dockerfile_instructions()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    assert final[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for op, rest in final if op == "RUN")
    assert re.search(r"pip install -c constraints\.txt [^&]*-r ", runs)  # the pinned dependencies
    assert re.search(r"pip install -c constraints\.txt [^&]*-e \.", runs)  # the project, in place
    env: dict[str, str] = {}
    for op, rest in final:
        if op == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(rest))  # type: ignore[misc]
    assert env.get("HF_HUB_OFFLINE") == "1"
    assert settings_env_problems(env) == []
    copies = " ".join(rest for op, rest in final if op == "COPY")
    for path in ("src/", "config/", "infra/config/", "constraints.txt", "pyproject.toml"):
        assert path in copies, path
    users = [rest for op, rest in final if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [rest for op, rest in final if op == "CMD"][-1] == '["ragtide", "retriever"]'
    ignored = set(DOCKERIGNORE.read_text(encoding="utf-8").split())
    assert {".venv", ".cache", ".data", ".git", "tests"} <= ignored


def test_docker_compose_config_when_the_client_can() -> None:
    docker = shutil.which("docker")
    version = [docker or "docker", "compose", "version"]
    if docker is None or subprocess.run(version, capture_output=True, check=False).returncode != 0:
        pytest.skip("no `docker compose` client on this machine")
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    cmd = [docker, "compose", "-f", str(COMPOSE_FILE), "config", "-q"]
    ok = subprocess.run(cmd, capture_output=True, text=True, env={**env, **SHELL_ENV}, check=False)
    assert ok.returncode == 0, ok.stderr
    gpu = [docker, "compose", "-f", str(COMPOSE_FILE), "-f", str(COMPOSE_GPU_FILE), "config", "-q"]
    merged = subprocess.run(gpu, capture_output=True, text=True, env={**env, **SHELL_ENV}, check=False)
    assert merged.returncode == 0, merged.stderr
    missing = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr
