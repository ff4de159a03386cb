"""The exceptions the core raises toward clients.

    LivegateError
    └── ApiError                  one client-facing failure: status, message, code
        ├── BadRequest            400
        ├── Unauthorized          401
        ├── QuotaExceeded         402
        ├── Forbidden             403
        ├── NotFound              404
        ├── MethodNotAllowed      405
        ├── Conflict              409
        ├── PayloadTooLarge       413
        ├── RateLimited           429
        └── UpstreamError         502  (the provider failed or answered nonsense)
            └── UpstreamTimeout   504

Each surface renders an `ApiError` in its own documented envelope (see
`app.api.envelopes`); the core never decides the envelope.
"""

from __future__ import annotations

from typing import Any


def well_formed(text: str) -> str:
    """`text` with each lone surrogate replaced by "?".

    A JSON `\\ud800` escape decodes to a lone surrogate, which no UTF-8 encoder takes:
    text an upstream chose could otherwise be neither rendered nor stored.
    """
    return text if text.isascii() else text.encode("utf-8", "replace").decode()


class LivegateError(Exception):
    pass


class ApiError(LivegateError):
    status_code = 500
    code = "internal_error"
    openai_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        status_code: int | None = None,
    ) -> None:
        message = well_formed(message)  # may quote an upstream's text; always rendered
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.code = code
        self.details = details
        self.headers = headers or {}


class BadRequest(ApiError):
    status_code = 400
    code = "invalid_request"
    openai_type = "invalid_request_error"


class Unauthorized(ApiError):
    status_code = 401
    code = "invalid_auth"
    openai_type = "authentication_error"


class QuotaExceeded(ApiError):
    status_code = 402
    code = "insufficient_quota"
    openai_type = "insufficient_quota"


class Forbidden(ApiError):
    status_code = 403
    code = "forbidden"
    openai_type = "permission_error"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"
    openai_type = "invalid_request_error"


class MethodNotAllowed(ApiError):
    status_code = 405
    code = "method_not_allowed"
    openai_type = "invalid_request_error"


class Conflict(ApiError):
    status_code = 409
    code = "conflict"
    openai_type = "invalid_request_error"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"
    openai_type = "invalid_request_error"


class RateLimited(ApiError):
    status_code = 429
    code = "rate_limited"
    openai_type = "rate_limit_error"


class UpstreamError(ApiError):
    status_code = 502
    code = "upstream_error"
    openai_type = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"
