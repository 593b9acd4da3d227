"""The gateway's OpenAPI document holds for what it answers: Schemathesis sends every operation requests generated
from the document itself, valid ones and (where a body or query can be wrong) invalid ones, and every answer must be
no 5xx, a status the document lists (each refusal OpenAI's error object: every operation's ``default``), a content
type it lists, and a body and headers its schema admits.

Left out: Schemathesis's check that a schema-valid request is accepted. Rules JSON Schema does not spell
(``stream_options`` only with ``stream``, a non-empty ``input``) refuse some such requests, as OpenAI does. (Fields the
schema does not name are valid, and taken and ignored, as OpenAI's SDK sends them with ``extra_body``.)
"""

from __future__ import annotations

import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, positive_data_acceptance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.integration.conftest import CHAT, EMBED, Stack

#: the models the generated requests name (the schema's ``model`` is any string: most would be unknown models)
SERVED = (CHAT, EMBED)


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: object) -> object:
    """Half the generated JSON bodies name a served model, so requests reach the queue and workers too."""
    if isinstance(body, dict) and isinstance(body.get("model"), str) and body["model"]:  # "": a negative case
        pick = zlib.crc32(body["model"].encode(errors="replace")) % (2 * len(SERVED))
        if pick < len(SERVED):
            body["model"] = SERVED[pick]
    return body


DEFAULT_DOCUMENT = schemathesis.openapi.from_dict(create_app(GatewaySettings()).openapi())


@pytest.fixture(scope="module")
def served(stack: Stack) -> OpenApiSchema:
    """The document the running gateway serves."""
    return schemathesis.openapi.from_url(f"{stack.gateway.base_url}/openapi.json")


#: the operations of a gateway with default settings (the served document must have each), with what can be sent
#: wrong to each: only a body or query parameters can be (a path parameter is any string)
OPERATIONS = [
    pytest.param(operation.label, mode, id=f"{operation.label}-{mode.value}")
    for operation in (result.ok() for result in DEFAULT_DOCUMENT.get_all_operations())
    for mode in GenerationMode
    if mode is GenerationMode.POSITIVE or operation.body or operation.query
]
#: a 5xx the document lists for the operation, and so no server error: /ready answers 503 while a model has no worker
#: (this stack configures one that never gets one)
LISTED_5XX = {"GET /ready"}


@pytest.mark.parametrize(("label", "mode"), OPERATIONS)
def test_every_answer_is_the_documented_one(
    stack: Stack, served: OpenApiSchema, label: str, mode: GenerationMode
) -> None:
    operation = next(result.ok() for result in served.get_all_operations() if result.ok().label == label)
    left_out = [positive_data_acceptance]
    if label in LISTED_5XX:
        left_out.append(not_a_server_error)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
    def answers(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=stack.gateway.base_url, excluded_checks=left_out, timeout=30)

    answers()
