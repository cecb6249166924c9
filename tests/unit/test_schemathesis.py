"""Schemathesis against the app's own OpenAPI spec: generated requests, valid and invalid, never get a 5xx, and
every response conforms to the spec (status codes, content types, bodies, headers).

Schemathesis' pytest plugin does not run on pytest 9 yet, so each operation's Hypothesis strategy is driven
directly, in both generation modes. Derandomized, so CI sees the same requests every run; run it with
`--hypothesis-seed=N` (and derandomize off) to explore further."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import negative_data_rejection
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.doubles import EchoGenerator
from tests.unit.test_answer import make_api

# Schemathesis' defaults plus 413, the documented answer to a body over gateway.max_body_bytes: a rule JSON Schema
# cannot state (the texts of one embeddings request can each be within limits and still add up to more).
CHECKS = {
    "positive_data_acceptance": {"expected-statuses": ["2xx", "3xx", "401", "403", "404", "409", "413", "429", "5xx"]},
    "negative_data_rejection": {
        "expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]
    },
}


@pytest.fixture(scope="module")
def api_schema() -> Iterator[OpenApiSchema]:
    config = SchemathesisConfig.from_dict({"checks": CHECKS})
    for api in make_api(EchoGenerator()):
        yield schemathesis.openapi.from_asgi("/openapi.json", api.client.app, config=config)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_5xx_and_responses_match_the_spec(api_schema: OpenApiSchema, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    served = {"POST /v1/search", "POST /v1/answer", "POST /v1/chat/completions", "POST /v1/embeddings"}
    assert served | {"GET /v1/models"} <= {op.label for op in operations}
    nothing_to_break = []
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )
        def run(case: schemathesis.Case) -> None:
            # A repeated query parameter (?limit=1&limit=2) is "an array" to schemathesis and the last value to
            # every web framework: only bodies are held to rejecting schema-violating input.
            skip = [negative_data_rejection] if case.method == "GET" else []
            case.call_and_validate(excluded_checks=skip)

        try:
            run()
        except Unsatisfiable:  # an operation without parameters or body has no invalid request
            assert mode is GenerationMode.NEGATIVE
            nothing_to_break.append(op.label)
    assert not [label for label in nothing_to_break if label.startswith("POST")]
