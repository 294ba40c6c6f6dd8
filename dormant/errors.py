"""Errors a client can see, and their OpenAI bodies.

    DormantError                      500 server_error
     ├── InvalidRequest               400 invalid_request_error (with `param`)
     ├── AuthenticationFailed         401 authentication_error (WWW-Authenticate: Bearer)
     ├── ModelNotFound                404 invalid_request_error, code model_not_found
     ├── RequestTooLarge              413 invalid_request_error, code request_too_large
     ├── QueueFull                    429 rate_limit_exceeded   (Retry-After)
     ├── ModelUnavailable             503 service_unavailable   (Retry-After): start failed,
     │                                    worker crashed, shutting down
     └── WorkerError                  502 server_error: the worker answered with an error

Every body has the spec's shape `{"error": {"message", "type", "param", "code"}}`, with
`code` a string or null. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Any


class DormantError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def to_openai_body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)

    def headers(self) -> dict[str, str]:
        if self.retry_after is not None:
            return {"Retry-After": str(max(1, min(60, int(self.retry_after))))}
        return {}


class InvalidRequest(DormantError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(DormantError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="dormant"'}


class ModelNotFound(DormantError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class RequestTooLarge(DormantError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(DormantError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 5, **kw: Any) -> None:
        super().__init__(message, retry_after=retry_after, **kw)


class ModelUnavailable(DormantError):
    status_code = 503
    error_type = "service_unavailable"
    code = "model_unavailable"

    def __init__(self, message: str, *, retry_after: int = 10, **kw: Any) -> None:
        super().__init__(message, retry_after=retry_after, **kw)


class WorkerError(DormantError):
    status_code = 502
    error_type = "server_error"
    code = "worker_error"


def error_body(message: str, error_type: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
