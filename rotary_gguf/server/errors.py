"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the HTTP status that goes
with them. Every refusal of the server is an APIError; nothing else reaches a client as an error body."""

from __future__ import annotations

from starlette.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses (or cannot finish), as OpenAI reports it."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400: a field is missing, ill-typed or out of range."""
    return APIError(400, message, param=param, code=code)


def unsupported(param: str, why: str = "") -> APIError:
    """400 for a field that would change the result and that this server does not implement."""
    return APIError(400, f"'{param}' is not supported by rotary serve{': ' + why if why else ''}", param=param,
                    code="unsupported_parameter")


def server_error(message: str) -> APIError:
    return APIError(500, message, type="server_error")


def unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the key given to "
                         "rotary serve --api-key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def busy(waiting: int, limit: int, retry_after: int) -> APIError:
    return APIError(429, f"the server is busy: {waiting} requests are waiting (--max-queue {limit}); "
                         f"retry in {retry_after} s", type="requests", code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry_after)})


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body has {size} bytes or more; the limit is {limit} bytes",
                    code="request_too_large")
