"""Schemathesis against the server's own OpenAPI schema, on a live loopback server with a tiny model.

Positive and negative cases on every endpoint: no 5xx, every status documented, every body
matching its documented schema, and schema-invalid input always rejected with a 4xx.
`positive_data_acceptance` is off: schema-valid requests may still be refused by design
(prompt longer than the context, a weaker guard than the server's, an unknown role).
Bounded for CI by FUZZ_EXAMPLES; bench/fuzz_long.sh runs the long version.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.checks import not_a_server_error

from bench.load_test import serve_in_thread
from neuronguard.models.hooks import count_hooks
from testkit.server_support import app_for, bundle_path, runtime, settings  # noqa: F401 - fixtures

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def live_base(runtime, settings) -> Iterator[str]:
    with serve_in_thread(app_for(runtime, settings, max_tokens_default=4)) as base:
        yield base
    assert count_hooks(runtime.loaded.model) == 0 and count_hooks(runtime.patch_source.model) == 0


def _operations(base: str) -> list:
    return [result.ok() for result in schemathesis.openapi.from_url(f"{base}/openapi.json").get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_server_errors_and_no_schema_violations(live_base: str, mode: GenerationMode) -> None:
    operations = _operations(live_base)
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/moderations", "/v1/guard/check"}
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis_settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            case.call_and_validate(base_url=live_base, checks=CHECKS, timeout=60)

        fuzz()
