"""Schemathesis against the OpenAPI schema: whatever a client sends, no 5xx and the documented shapes.

The app runs in-process with the in-process stores (schemathesis drives its
lifespan). Each operation gets a few valid (positive) and invalid (negative)
examples, which keeps this to seconds. Every other default check runs: no 5xx,
documented status codes and content types, responses that match their schema. The strategies are driven by hand rather
than through ``schemathesis.pytest.from_fixture``, whose use of a private
pytest attribute breaks on pytest 9.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.python.asgi import shutdown_lifespans

from service.app import create_app
from service.settings import Settings

API_KEY = "fuzz-key-0123456789"


@pytest.fixture(scope="module", params=[False, True], ids=["open writes", "api keys"])
def api_schema(
    request: pytest.FixtureRequest, tiny_checkpoint: Path, make_settings: Callable[..., Settings]
) -> Iterator[tuple[schemathesis.BaseSchema, dict[str, str]]]:
    """The schema, and the headers every call carries: the key when writes need one (schemathesis's auth check
    then also sends the request without it and with a wrong one, and expects 401)."""
    keys = [API_KEY] if request.param else []
    app = create_app(make_settings(batch_max_wait_ms=0, api_keys=keys))
    yield schemathesis.openapi.from_asgi("/openapi.json", app), {"X-API-Key": API_KEY} if keys else {}
    shutdown_lifespans()


def free_text(parameter: dict) -> bool:
    """A path parameter that any text is (no type but string, no bound, no pattern)."""
    schema = parameter.get("schema", {})
    return parameter.get("in") == "path" and schema.get("type") == "string" and set(schema) <= {"type", "title"}


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_server_errors(api_schema: tuple[schemathesis.BaseSchema, dict[str, str]], mode: GenerationMode) -> None:
    schema, headers = api_schema
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/recommend",
        "/users/{user_id}/events",
        "/items/{item_id}",
        "/items/external/{external_id}",
    }
    for operation in operations:
        raw = operation.definition.raw
        # nothing to get wrong in GET /healthz, nor in a free-text path segment (any text is an external id;
        # an unknown one is a 404), whose only value against the schema, the empty one, is not sent
        breakable = [p for p in raw.get("parameters", []) if not free_text(p)]
        if mode is GenerationMode.NEGATIVE and not (breakable or raw.get("requestBody")):
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            # schema-valid is not always acceptable: item ids must exist in the catalog,
            # users must have a history; those are 4xx by design, never 5xx
            case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

        check()
