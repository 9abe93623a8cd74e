"""The Open Inference Protocol v2 over gRPC through the gateway: the official grpcio client ->
real Envoy (h2c) -> extproc (model_name from the protobuf body, auth, rate limits, scheduling)
-> simulator pods' gRPC ports (HTTP/2). Every test runs against both ext_proc transports
(``--transport grpc`` and ``--transport h2``): switching transport loses nothing."""

from __future__ import annotations

import contextlib
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controllers.xds.generate import GRPC_PODS_CLUSTER
from fleet.oip import grpc_predict_v2_pb2 as oip
from fleet.oip import grpc_predict_v2_pb2_grpc as oip_grpc
from matrixinfer.process import ReadinessTimeout, free_port, wait_until
from matrixinfer.stack import GatewayStack
from matrixinfer.testing.metrics import metric
from sim.fleet import Fleet
from tests.conftest import sim_fleet
from tests.extproc.helpers import server_yaml
from tests.policies.conftest import documents, keys_yaml, policy_stack, route_yaml

HOST = "127.0.0.110"
KEYS = {"key-alice": ("acme", "alice", [])}


def routes(grpc_port: int) -> str:
    return documents(
        server_yaml("grpc-pool", {"app": "grpc-sim"}, model="demo-model", grpc_port=grpc_port),
        server_yaml("http-pool", {"app": "grpc-sim"}, model="demo-model"),  # no grpcPort
        ROUTES,
    )


ROUTES = documents(
    route_yaml("grpc-open", "grpc-model", server="grpc-pool"),
    route_yaml("http-open", "http-model", server="http-pool"),
    route_yaml("grpc-usage", "usage-model", server="grpc-pool"),
    route_yaml(
        "grpc-output",
        "output-model",
        server="grpc-pool",
        rateLimit="{outputTokensPerUnit: 100, unit: hour, scope: route}",
    ),
    route_yaml("grpc-keyed", "keyed-model", server="grpc-pool"),
    route_yaml(
        "grpc-limited",
        "limited-model",
        server="grpc-pool",
        rateLimit="{requestsPerUnit: 1, unit: hour, scope: user}",
    ),
)


@pytest.fixture(scope="module")
def grpc_port() -> int:
    return free_port(HOST)


@pytest.fixture(scope="module")
def grpc_fleet(tmp_path_factory: pytest.TempPathFactory, grpc_port: int) -> Iterator[Fleet]:
    with sim_fleet(
        tmp_path_factory, HOST, 2, "--time-scale", "0.01", "--grpc-port", str(grpc_port),
        "--output-len", "uniform:4:8", logs="grpc-sims", name_prefix="grpc",
    ) as f:  # fmt: skip
        yield f


@pytest.fixture(scope="module", params=["grpc", "h2"])
def stack(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    grpc_fleet: Fleet,
    grpc_port: int,
) -> Iterator[GatewayStack]:
    config = tmp_path_factory.mktemp("grpc-config")
    (config / "model.yaml").write_text(routes(grpc_port))
    lines = [
        "apiVersion: gateway.matrixinfer.ai/v1alpha1\nkind: Endpoints\n"
        "metadata: {name: grpc-sims}\nspec:\n  endpoints:"
    ]
    for pod in grpc_fleet.pods:
        lines.append(
            f"  - {{name: {pod.name}, address: '{pod.address}', labels: {{app: grpc-sim}}}}"
        )
    (config / "sims.yaml").write_text("\n".join(lines) + "\n")
    secrets = tmp_path_factory.mktemp("grpc-secrets")
    (secrets / "keys.yaml").write_text(keys_yaml(KEYS))
    auth = secrets / "auth.yaml"
    auth.write_text(
        f"apiKeysFile: {secrets / 'keys.yaml'}\nreloadIntervalSeconds: 0.1\n"
        "anonymousRoutes: [grpc-open, http-open, grpc-usage, grpc-output]\n"
    )
    s = policy_stack(
        config,
        tmp_path_factory.mktemp(f"grpc-run-{request.param}"),
        grpc_fleet,
        ("--auth-config", str(auth)),
        transport=request.param,
    )
    grpc_hosts = {f"{p.host}:{grpc_port}" for p in grpc_fleet.pods}
    try:
        wait_until(
            lambda: grpc_hosts <= s.envoy_hosts(GRPC_PODS_CLUSTER),
            60,
            "the pods' gRPC ports in Envoy",
        )
        yield s
    finally:
        s.stop()


@pytest.fixture
def channel(stack: GatewayStack) -> Iterator[grpc.Channel]:
    target = f"{stack.options.listen_host}:{stack.listen_port}"
    with grpc.insecure_channel(target) as ch:
        yield ch


def infer_request(model: str, text: str = "hello there", max_tokens: int = 5) -> object:
    tensor = oip.ModelInferRequest.InferInputTensor(
        name="text_input",
        datatype="BYTES",
        shape=[1],
        contents=oip.InferTensorContents(bytes_contents=[text.encode()]),
    )
    return oip.ModelInferRequest(
        model_name=model,
        inputs=[tensor],
        parameters={"max_tokens": oip.InferParameter(int64_param=max_tokens)},
    )


def stub(channel: grpc.Channel) -> oip_grpc.GRPCInferenceServiceStub:
    return oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def test_model_infer_answers_text_from_a_pod(channel: grpc.Channel) -> None:
    response, call = stub(channel).ModelInfer.with_call(infer_request("grpc-model"), timeout=20)
    (output,) = response.outputs
    assert output.name == "text_output" and output.datatype == "BYTES"
    assert output.contents.bytes_contents[0].strip()
    assert response.model_name == "demo-model"  # the ModelServer's model: the route rewrote it
    assert 1 <= response.parameters["completion_tokens"].int64_param <= 5
    headers = dict(call.initial_metadata())
    assert headers.get("x-inference-pod", "").startswith("grpc") or "x-request-id" in headers


def test_stream_of_requests_gets_one_answer_each(channel: grpc.Channel) -> None:
    requests = [infer_request("grpc-model", f"prompt {i}", 3) for i in range(3)]
    answers = list(stub(channel).ModelStreamInfer(iter(requests), timeout=20))
    assert len(answers) == 3
    assert all(not a.error_message for a in answers)
    assert all(a.infer_response.outputs[0].contents.bytes_contents for a in answers)


def test_usage_is_settled_from_the_engines_counts(
    stack: GatewayStack, channel: grpc.Channel
) -> None:
    """The engine's response parameters prompt_tokens/completion_tokens, read by Envoy's
    usage.lua, settle the call's usage (summed over a ModelStreamInfer's responses). The waits
    read usage-model's own counters: other tests' late reports move the others."""

    def tokens() -> tuple[float, float]:
        return (
            metric(stack, "matrixinfer_gateway_usage_tokens_total", model="usage-model",
                   kind="prompt"),
            metric(stack, "matrixinfer_gateway_usage_tokens_total", model="usage-model",
                   kind="completion"),
        )  # fmt: skip

    def settled(before: tuple[float, float], answers: list[Any]) -> tuple[float, float]:
        prompt = sum(a.parameters["prompt_tokens"].int64_param for a in answers)
        completion = sum(a.parameters["completion_tokens"].int64_param for a in answers)
        assert prompt > 0 and completion > 0
        want = (before[0] + prompt, before[1] + completion)
        with contextlib.suppress(ReadinessTimeout):  # the assertion below says what came
            wait_until(lambda: tokens() == want, 30, "usage-model's usage settled")
        return want

    before = tokens()
    response = stub(channel).ModelInfer(infer_request("usage-model", "count me " * 20), timeout=20)
    want = settled(before, [response])
    assert tokens() == want
    before = tokens()
    requests = [infer_request("usage-model", f"prompt {i} " * (i + 1), 3) for i in range(3)]
    answers = [a.infer_response for a in stub(channel).ModelStreamInfer(iter(requests), timeout=20)]
    want = settled(before, answers)
    assert tokens() == want


def test_calls_reserve_their_max_tokens_not_the_whole_output_budget(
    channel: grpc.Channel,
) -> None:
    """100 output tokens an hour: three calls of max_tokens 5 at once are all admitted (each
    reserves 5; a call that reserved the whole budget would leave the others nothing)."""
    s = stub(channel)
    calls = [s.ModelInfer.future(infer_request("output-model", max_tokens=5), timeout=20)
             for _ in range(3)]  # fmt: skip
    answers = [c.result() for c in calls]
    assert all(1 <= a.parameters["completion_tokens"].int64_param <= 5 for a in answers)


def test_server_and_model_readiness(channel: grpc.Channel) -> None:
    s = stub(channel)
    assert s.ServerLive(oip.ServerLiveRequest(), timeout=20).live
    assert s.ServerReady(oip.ServerReadyRequest(), timeout=20).ready
    assert s.ModelReady(oip.ModelReadyRequest(name="grpc-model"), timeout=20).ready


def test_unknown_model_is_not_found(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).ModelInfer(infer_request("no-such-model"), timeout=20)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in (err.value.details() or "")


def test_a_model_server_without_a_grpc_port_is_unavailable(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).ModelInfer(infer_request("http-model"), timeout=20)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "ModelServer 'http-pool' serves no gRPC" in (err.value.details() or "")


def test_missing_model_name_is_invalid_argument(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub(channel).ModelInfer(oip.ModelInferRequest(), timeout=20)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_name" in (err.value.details() or "")


def test_bad_or_missing_key_is_unauthenticated(channel: grpc.Channel) -> None:
    s = stub(channel)
    for metadata in ((), (("authorization", "Bearer wrong-key"),)):
        with pytest.raises(grpc.RpcError) as err:
            s.ModelInfer(infer_request("keyed-model"), metadata=metadata, timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    ok = s.ModelInfer(
        infer_request("keyed-model"), metadata=(("authorization", "Bearer key-alice"),), timeout=20
    )
    assert ok.outputs[0].contents.bytes_contents


def test_over_the_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    s = stub(channel)
    key = (("authorization", "Bearer key-alice"),)
    s.ModelInfer(infer_request("limited-model"), metadata=key, timeout=20)
    with pytest.raises(grpc.RpcError) as err:
        s.ModelInfer(infer_request("limited-model"), metadata=key, timeout=20)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request" in (err.value.details() or "")


def test_http_requests_still_go_over_http1(stack: GatewayStack, tmp_path: Path) -> None:
    """The HTTP pods cluster is unchanged: an OpenAI request still reaches the same pods."""
    body = json.dumps({"model": "grpc-model", "prompt": "hi", "max_tokens": 2}).encode()
    request = urllib.request.Request(
        f"{stack.url}/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=20) as resp:
        assert json.loads(resp.read())["choices"][0]["text"]
