"""An existing Kafka reached over SASL_SSL with SCRAM, and an existing Connect: `ragtide up` starts neither, and
every client (Connect's worker and Debezium's producer, the embedder's Faust consumer, the admin and offset
readers) authenticates over TLS. The broker is the local KRaft node with a SASL_SSL listener; the test makes
its CA, the broker's certificate and the SCRAM credentials."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from ragtide.contracts.errors import ConfigError
from ragtide.contracts.settings import RagtideSettings, load_settings
from ragtide.ingest.connector import topic_end_offsets
from ragtide.stack.jvm import KafkaBroker
from ragtide.stack.process import free_port
from ragtide.stack.stack import Stack
from tests.e2e.conftest import own_stack_settings, poll, stopped_after

PASSWORD = "s3cret-for-this-test"
SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule required;"


def make_certificates(folder: Path) -> tuple[Path, Path]:
    """A CA, and a broker key + certificate for 127.0.0.1 signed by it: (ca.pem, broker.pem with key and chain)."""

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ragtide test CA",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "broker.key", "-out", "broker.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "broker.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "broker.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    )
    keystore = folder / "broker.pem"
    keystore.write_text("".join((folder / f).read_text() for f in ("broker.key", "broker.crt", "ca.pem")))
    return folder / "ca.pem", keystore


def sasl_listener(plain: int, sasl: int, controller: int, keystore: Path) -> dict[str, str]:
    return {
        "listeners": f"PLAINTEXT://127.0.0.1:{plain},SASL_SSL://127.0.0.1:{sasl},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{plain},SASL_SSL://127.0.0.1:{sasl}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms": "SCRAM-SHA-256",
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": SCRAM_LOGIN,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(keystore),
    }


@pytest.fixture(scope="module")
def secured() -> Iterator[RagtideSettings]:
    managed = own_stack_settings("ragtide-sasl-", [], generator={"local": False})
    certs = managed.data_dir / "certs"
    certs.mkdir()
    ca, keystore = make_certificates(certs)
    sasl_port = free_port()
    settings = load_settings(
        RagtideSettings,
        **{
            **{k: getattr(managed, k).model_dump() for k in ("postgres", "connect", "api", "generator")},
            "data_dir": managed.data_dir,
            "sources_file": managed.sources_file,
            "kafka": {
                **managed.kafka.model_dump(),
                "bootstrap_servers": f"127.0.0.1:{sasl_port}",
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-256",
                "sasl_username": "ragtide",
                "sasl_password": PASSWORD,
                "ssl_cafile": str(ca),
                "replication_factor": 1,  # a one-broker cluster
            },
        },
    )
    k = managed.kafka
    with stopped_after(settings) as stack:
        KafkaBroker(
            managed,
            stack.daemon("kafka"),
            extra=sasl_listener(k.port, sasl_port, k.controller_port, keystore),
            format_args=("--add-scram", f"SCRAM-SHA-256=[name=ragtide,password={PASSWORD}]"),
        ).start()
        yield settings


def test_the_listener_refuses_a_wrong_password(secured: RagtideSettings) -> None:
    wrong = secured.kafka.model_copy(update={"sasl_password": SecretStr("wrong")})

    async def connect() -> None:
        admin = AIOKafkaAdminClient(**wrong.client_config(), request_timeout_ms=5000)
        try:
            await admin.start()
        finally:
            await admin.close()

    with pytest.raises(KafkaError):
        asyncio.run(connect())
    assert asyncio.run(topic_end_offsets(secured.kafka, "no-such-topic")) == {}  # the right password works


def test_a_replication_factor_above_the_cluster_size_is_refused(secured: RagtideSettings) -> None:
    default = secured.model_copy(update={"kafka": secured.kafka.model_copy(update={"replication_factor": None})})
    with pytest.raises(ConfigError, match=r"kafka\.replication_factor is 3 but Kafka at .* has 1 broker"):
        Stack(default).start_kafka()  # before Connect would wait forever for topics it cannot create


def test_up_uses_the_existing_kafka_over_sasl_ssl_and_an_existing_connect(secured: RagtideSettings) -> None:
    stack = Stack(secured)
    stack.up()
    with psycopg.connect(secured.postgres.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.docs (id, title, body, topic, category) VALUES "
            "(424242, 'Narwhal tusks', 'A narwhal tusk is a tooth that senses salinity', 't', 'c')"
        )

    def found() -> bool:
        body = {"query": "narwhal tusk senses salinity", "k": 1}
        hits = httpx.post(f"{secured.api.url}/v1/search", json=body, timeout=30).json()["hits"]
        return bool(hits) and hits[0]["row_id"] == "424242"

    poll(found, "a row streamed through Kafka over SASL_SSL")

    # Connect as the user's: another data folder, so a worker `up` started would have its own pid file and port.
    elsewhere = secured.data_dir / "elsewhere"
    elsewhere.mkdir()
    external = secured.model_copy(
        update={
            "data_dir": elsewhere,
            "connect": secured.connect.model_copy(update={"rest_url": secured.connect.url, "port": free_port()}),
        }
    )
    Stack(external).start_connect()
    assert Stack(external).daemon("connect").pid() is None  # no worker started
    status = httpx.get(f"{external.connect.url}/connectors/{external.connect.connector_name}/status").json()
    assert status["connector"]["state"] == "RUNNING"
