"""OpenAI-style errors: every failure the server answers has the body
``{"error": {"message", "type", "param", "code"}}`` so OpenAI clients raise their usual exceptions
(BadRequestError, NotFoundError, RateLimitError, ...) with our message in them."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SpecBranchError

log = logging.getLogger("specbranch.server")


class APIError(Exception):
    """An error answered to the client as it is (status + OpenAI error body)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=headers)


def _loc(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages.0.role' (the OpenAI 'param')."""
    return ".".join(str(p) for p in (loc[1:] if loc and loc[0] == "body" else loc))


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        ctx = bad_json[0].get("ctx") or {}
        return APIError(400, f"the request body is not valid JSON: {ctx.get('error', bad_json[0].get('msg'))}",
                        code="invalid_json")
    first = errors[0]
    param = _loc(tuple(first.get("loc", ())))
    if param == "":  # the body as a whole: absent, not an object, or not sent as JSON
        return APIError(400, "the request body must be a JSON object sent with Content-Type: application/json",
                        code="invalid_json")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    where = f"'{param}'" if param else "the request body"
    return APIError(400, f"invalid value for {where}: {first.get('msg')}{more}", param=param or None,
                    code="invalid_type" if first.get("type", "").endswith("_type") else "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure to an OpenAI-style body; nothing a client sends can take the server down."""

    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(SpecBranchError)
    async def _library(_: Request, exc: SpecBranchError) -> JSONResponse:
        # ConfigError / ModelError carry a user-facing message with the fix in it.
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        return error_response(err, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error"))
