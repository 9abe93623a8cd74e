"""OpenAI-style errors the gateway answers itself (never a traceback to a caller).

Every error names the field or value at fault. :class:`GatewayError` carries the HTTP status and the
``{"error": {"message", "type", "param", "code"}}`` body that OpenAI clients understand.
"""

from __future__ import annotations

import orjson

__all__ = [
    "GRPC_CODES",
    "GatewayError",
    "bad_request",
    "body_too_large",
    "grpc_unimplemented",
    "internal_error",
    "method_not_allowed",
    "model_not_found",
    "no_pod_available",
    "no_rule_matched",
    "path_not_found",
]


# the gRPC status code of a gateway answer to a gRPC caller, by the HTTP status of the same answer
# (the codes of grpc/doc/statuscodes.md); any other status: UNKNOWN (2)
GRPC_CODES: dict[int, int] = {
    400: 3,  # INVALID_ARGUMENT
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 5,  # NOT_FOUND
    405: 12,  # UNIMPLEMENTED
    408: 4,  # DEADLINE_EXCEEDED
    413: 8,  # RESOURCE_EXHAUSTED (message larger than the limit)
    429: 8,  # RESOURCE_EXHAUSTED
    500: 13,  # INTERNAL
    501: 12,  # UNIMPLEMENTED
    503: 14,  # UNAVAILABLE
    504: 4,  # DEADLINE_EXCEEDED
}


class GatewayError(Exception):
    """An error answered by the gateway as an OpenAI-style JSON body."""

    __slots__ = ("code", "error_type", "message", "param", "status")

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str,
        code: str,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.param = param

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.error_type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    def __repr__(self) -> str:
        return f"GatewayError({self.status}, {self.message!r}, code={self.code!r})"


def bad_request(
    message: str, param: str | None = None, code: str = "invalid_request"
) -> GatewayError:
    return GatewayError(400, message, error_type="invalid_request_error", code=code, param=param)


def body_too_large(size: int | None, limit: int) -> GatewayError:
    got = f" ({size} bytes)" if size is not None else ""
    return GatewayError(
        413,
        f"request body{got} is larger than the gateway's limit of {limit} bytes",
        error_type="invalid_request_error",
        code="request_too_large",
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"the model '{model}' does not exist: no ModelRoute serves it",
        error_type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def no_rule_matched(route: str, model: str) -> GatewayError:
    return GatewayError(
        404,
        f"no rule of ModelRoute '{route}' matches this request for model '{model}'",
        error_type="invalid_request_error",
        code="no_matching_rule",
        param="model",
    )


def path_not_found(method: str, path: str) -> GatewayError:
    return GatewayError(
        404,
        f"{method} {path} is not served by this gateway; it serves GET /v1/models, "
        "GET /v1/models/{model} and POST /v1/chat/completions, /v1/completions, /v1/embeddings, "
        "/v1/responses, /tokenize, /detokenize, /v1/rerank, /v1/score, /pooling, /classify and "
        "/v1/audio/*",
        error_type="invalid_request_error",
        code="unknown_url",
    )


def method_not_allowed(method: str, path: str, allowed: str) -> GatewayError:
    return GatewayError(
        405,
        f"{method} is not allowed on {path}; use {allowed}",
        error_type="invalid_request_error",
        code="method_not_allowed",
    )


def grpc_unimplemented(path: str) -> GatewayError:
    return GatewayError(
        501,
        f"{path} is not a method of inference.GRPCInferenceService the gateway serves; it serves "
        "ModelInfer, ModelStreamInfer, ModelReady, ModelMetadata, ServerLive, ServerReady and "
        "ServerMetadata",
        error_type="invalid_request_error",
        code="unimplemented",
    )


def internal_error(request_id: str) -> GatewayError:
    return GatewayError(
        500,
        f"the gateway failed to process this request (request id {request_id}); "
        "the error is in the extproc log",
        error_type="internal_error",
        code="internal_error",
    )


def no_pod_available(reason: str) -> GatewayError:
    return GatewayError(
        503,
        f"no ready pod can serve this request: {reason}",
        error_type="service_unavailable",
        code="no_pod_available",
    )
