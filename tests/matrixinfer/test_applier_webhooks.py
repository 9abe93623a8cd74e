"""The local mode's admission (matrixinfer.applier.admit) answers as the real webhooks do: the
same objects, sent as AdmissionReviews to the operator's webhook server and given to admit()
with the objects the API holds, get the same verdict and the same message."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml

from controllers.webhooks.handlers import KINDS, VERSION, WebhookConfig
from matrixinfer.applier import Key, admit
from matrixinfer.process import free_port
from matrixinfer.resources import project_file
from matrixinfer.testing.kube import emulator, eventually, operator
from tests.controllers import webhook_objects as w
from tests.controllers.test_webhook_server import (
    MUTATING,
    VALIDATING,
    Webhooks,
    webhooks,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def hooks() -> AsyncIterator[Webhooks]:
    async with emulator() as api:
        config = WebhookConfig(port=free_port(), addr="127.0.0.1", host="127.0.0.1")
        async with operator(api, webhooks=config), aiohttp.ClientSession() as session:
            await eventually(
                lambda: webhooks(api, VALIDATING) and webhooks(api, MUTATING),
                30,
                "the operator to write its webhook configurations",
            )
            yield Webhooks(api, session)


def stored(hooks: Webhooks) -> dict[Key, dict[str, Any]]:
    out: dict[Key, dict[str, Any]] = {}
    for kind, (group, plural) in KINDS.items():
        for name, raw in hooks.api.objects(f"{group}/{VERSION}/{plural}", w.NS).items():
            out[(kind, w.NS, name)] = raw
    return out


async def same_verdict(hooks: Webhooks, obj: dict[str, Any]) -> str:
    """The webhook's and admit()'s verdicts agree; returns the message ("" when allowed)."""
    response = await hooks.review(obj)
    review, _ = admit(obj, stored(hooks))
    assert response["allowed"] is review.allowed, (response, review)
    if review.allowed:
        return ""
    assert response["status"]["message"] == review.message()
    return review.message()


def example(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(project_file(f"examples/invalid/{name}").read_text())
    doc["metadata"]["namespace"] = w.NS
    return doc


async def test_admit_gives_the_webhooks_verdicts_and_messages(hooks: Webhooks) -> None:
    for name in (
        "model-route-weight-partial.yaml",
        "model-duplicate-backend.yaml",
        "model-duplicate-lora.yaml",
        "modelroute-weights-partial.yaml",
        "modelserver-duplicate-scorer.yaml",
    ):
        assert await same_verdict(hooks, example(name)), name
    # cross-object rules: a stored Model's adapter and the route its controller generated
    await hooks.create(w.model("first", loras=["shared"]))
    await eventually(
        lambda: "first" in hooks.api.objects("networking.matrixinfer.ai/v1alpha1/modelroutes"),
        30,
        "the Model controller's route",
    )
    message = await same_verdict(hooks, w.model("second", loras=["shared"]))
    assert "LoRA adapter 'shared' is already served by Model ns/first" in message
    message = await same_verdict(hooks, w.route("r2", model="first"))
    assert "model name 'first' is already served by ModelRoute ns/first" in message
    assert await same_verdict(hooks, w.model("third", loras=["own"])) == ""
