"""Errors, answered in OpenAI's error body: ApiError (raised by any handler, turned into its JSON
response by the `api_errors` middleware) and the errors a test asks for, either a fraction of all
inference requests (SimConfig.error_rates) or one item at a time (SIMULATE_400 / SIMULATE_500 in a
prompt)."""

from __future__ import annotations

import json
import random

from aiohttp import web


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status, message, type="invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def json_response(status: int, payload, headers: dict | None = None) -> web.Response:
    """Every JSON answer of the simulator, errors or not."""
    return web.Response(
        status=status, body=json.dumps(payload).encode(), content_type="application/json", headers=headers
    )


@web.middleware
async def api_errors(request: web.Request, handler) -> web.StreamResponse:
    """Let handlers raise ApiError instead of building error responses."""
    try:
        return await handler(request)
    except ApiError as e:
        return json_response(e.status, e.body())


def injected_error(status: int) -> ApiError:
    """The error OpenAI answers with this status, worded as OpenAI words it."""
    if status == 429:
        return ApiError(
            429, "Rate limit reached (simulated). Please try again later.", "requests", "rate_limit_exceeded"
        )
    if status == 503:
        return ApiError(503, "The engine is currently overloaded, please try again later.", "server_error")
    if status >= 500:
        return ApiError(
            status, "The server had an error while processing your request. Sorry about that!", "server_error"
        )
    return ApiError(status, f"Simulated error {status}.")


def prompt_error(echo: str) -> ApiError | None:
    """Per-item failures a test can ask for by putting SIMULATE_400 / SIMULATE_500 in its prompt."""
    if "SIMULATE_400" in echo:
        return ApiError(400, "Simulated invalid request (SIMULATE_400 in prompt).")
    if "SIMULATE_500" in echo:
        return ApiError(500, "Simulated server error (SIMULATE_500 in prompt).", "server_error")
    return None


class ErrorInjector:
    """Decides which inference requests are answered with an error status instead (SimConfig.error_rates)."""

    def __init__(self, error_rates: dict[int, float], seed: int):
        # One generator per status, seeded from (seed, status), drawn once per request each: the
        # number of injected errors per status is then fixed by the seed and the request count,
        # whatever order concurrent requests arrive in.
        self._draws = sorted((status, rate, random.Random(f"{seed}:{status}")) for status, rate in error_rates.items())

    def draw(self) -> int | None:
        """The status to answer the next request with, or None to answer it normally."""
        hit = None
        for status, rate, rng in self._draws:
            if rng.random() < rate and hit is None:
                hit = status
        return hit
