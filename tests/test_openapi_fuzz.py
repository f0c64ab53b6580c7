"""A schema-driven fuzzer (schemathesis) against a real gateway finds no server error but the 503s the schema
documents: every route with generated bodies, then call sequences that follow the schema's links from a created
collection into its routes. Bounded: a few examples per route and per sequence, no shrinking, no example database
(nothing written into the checkout), a hard timeout."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import FlakyStrategyDefinition

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BOUNDED = settings(max_examples=15, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=list(HealthCheck), print_blob=False)


@pytest.fixture(scope="module")
def fuzzed(gateway_factory, tagged_repo):
    """A gateway of its own (the fuzzer creates and deletes collections) on the tagged model (a tag head)."""
    return gateway_factory(HQCLIP_MODEL_REPO=str(tagged_repo))


@pytest.fixture(scope="module")
def document(fuzzed) -> dict:
    return httpx.get(fuzzed.url + "/openapi.json", timeout=30).json()


@pytest.fixture(scope="module")
def schema(fuzzed):
    return schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")


def server_error(document: dict, response, case) -> str | None:
    """What is wrong with a response: a 5xx, unless it is a 503 the route documents."""
    if response.status_code < 500:
        return None
    responses = document["paths"][case.operation.path][case.operation.method.lower()]["responses"]
    if response.status_code == 503 and "503" in responses:
        return None
    return f"{case.operation.label} -> {response.status_code}: {response.text[:500]}\n{case.as_curl_command()}"


def test_the_schema_links_a_created_collection_to_its_routes_and_has_examples(document):
    paths = document["paths"]
    operation_ids = {op["operationId"] for ops in paths.values() for op in ops.values()}
    links = paths["/v1/collections"]["post"]["responses"]["201"]["links"]
    assert {link["operationId"] for link in links.values()} <= operation_ids
    assert {"AddItems", "Search", "GetCollection"} <= set(links)
    assert all(link["parameters"] == {"collection": "$response.body#/name"} for link in links.values())
    for path in ("/v1/collections", "/v1/collections/{collection}/search", "/v1/embeddings"):
        assert paths[path]["post"]["requestBody"]["content"]["application/json"]["example"]


def test_every_route_with_generated_input(schema, document, fuzzed):
    problems: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @BOUNDED
        def fuzz(case):
            problem = server_error(document, case.call(timeout=60), case)
            if problem:
                problems.append(problem)

        fuzz()
    assert not problems, "\n\n".join(problems)
    assert httpx.get(fuzzed.url + "/health", timeout=10).status_code == 200


def test_call_sequences_along_the_links(schema, document):
    problems: list[str] = []
    reached: set[tuple[str, int]] = set()

    class Sequences(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"timeout": 60}

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            reached.add((case.operation.label, response.status_code))
            problem = server_error(document, response, case)
            if problem:
                problems.append(problem)

    try:
        Sequences.run(settings=settings(BOUNDED, max_examples=20, stateful_step_count=6))
    except FlakyStrategyDefinition:
        # Which rules a step can take depends on the server's answers (its bundles), so Hypothesis, when it draws a
        # sequence again from an earlier one's choices, can find that the rules on offer changed. That ends the run
        # early; every call made until then was checked below all the same.
        pass
    assert not problems, "\n\n".join(problems)
    into_a_collection = {label for label, status in reached if status < 300 and "{collection}" in label}
    assert into_a_collection, f"no link led into a created collection: {sorted(reached)}"
