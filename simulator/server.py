"""The server: the aiohttp application (`make_app`) and its routes, the live inference handler (auth,
injected errors, rate limits, latency), the statistics and request log behind /_sim/*, and the two
ways to run it: in the foreground (`run`, for `simulate_openai`) or in a thread (`serve_in_thread`,
for tests)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import math
import random
import threading
import time
from collections.abc import Iterator

from aiohttp import web

from simulator.answers import INFERENCE_ROUTES, MODELS, BadOutputs, new_id, prepare, respond
from simulator.batches import Batches
from simulator.config import RUNTIME_KEYS, SimConfig
from simulator.errors import ApiError, ErrorInjector, api_errors, injected_error, json_response
from simulator.files import MAX_FILE_BYTES, Files
from simulator.ratelimit import Limiter, RateLimited, RetryAudit

LOG_ENTRIES = 200_000  # kept for GET /_sim/log; the log file, if any, keeps every request

# What an inference handler tells the middleware to put in the request log.
MARKER = web.RequestKey("marker", str)
RETRY_AFTER_MS = web.RequestKey("retry_after_ms", int)


class Simulator:
    """The server's state: settings, statistics and request log, with the Files and Batches APIs
    alongside; its async methods are the aiohttp handlers for inference and /_sim/*."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.files = Files()
        self.bad_outputs = BadOutputs(config)  # shared with batches: /_sim/stats counts both
        self.batches = Batches(config, self.files, self.bad_outputs)
        self._log_file = open(config.log_path, "a", buffering=1) if config.log_path else None
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Statistics, log and seeded generators back to their start (files and batches are kept)."""
        cfg = self.config
        self.reset_limits()
        self._jitter_rng = random.Random(f"{cfg.seed}:jitter")
        self.batches.reset()
        self.total = self.rate_limited = self.bad_outputs.count = 0
        self.first_arrival: float | None = None  # unix time the first inference request arrived (start-up benches)
        self.max_in_flight = self.in_flight
        self.by_path: collections.Counter = collections.Counter()
        self.by_status: collections.Counter = collections.Counter()
        self.log: collections.deque = collections.deque(maxlen=LOG_ENTRIES)
        self.retry_audit = RetryAudit()

    def reset_limits(self) -> None:
        """Rate-limit buckets full again (empty with start_empty); error generators back at the start of
        their seeded sequence."""
        cfg = self.config
        self.limiter = Limiter(cfg.rpm, cfg.tpm, cfg.start_empty)
        self.errors = ErrorInjector(cfg.error_rates, cfg.seed)
        self.bad_outputs.restart()

    async def close(self) -> None:
        """Stop batches still running and close the log file."""
        await self.batches.close()
        if self._log_file:
            self._log_file.close()

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Auth, stats, the request log and x-request-id for every /v1 route."""
        if request.path.startswith("/_sim/"):
            return await handler(request)
        arrived = time.monotonic()
        if self.first_arrival is None and request.path in INFERENCE_ROUTES:
            self.first_arrival = time.time()
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight
        try:
            key = self.config.api_key
            if key and request.headers.get("Authorization") != "Bearer " + key:
                response = json_response(
                    401, ApiError(401, "Incorrect API key provided.", code="invalid_api_key").body()
                )
            elif not self.config.batch_api and request.path.startswith(("/v1/files", "/v1/batches")):
                raise web.HTTPNotFound()
            else:
                response = await handler(request)
        except web.HTTPException as e:  # the router's 404/405
            response = json_response(
                e.status, ApiError(e.status, f"{e.reason}: {request.method} {request.path}").body()
            )
        finally:
            self.in_flight -= 1
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else "(unmatched)"
        status = response.status
        self.total += 1
        self.by_path[path] += 1
        self.by_status[status] += 1
        if status == 429:
            self.rate_limited += 1
        if request.path in INFERENCE_ROUTES:
            self.retry_audit.record(
                await request.read(), arrived, status, request.get(MARKER), request.get(RETRY_AFTER_MS)
            )
        entry = {
            "t": time.time(),
            "path": path,
            "status": status,
            "marker": request.get(MARKER),
            "retry_after_ms": request.get(RETRY_AFTER_MS),
        }
        self.log.append(entry)
        if self._log_file:
            self._log_file.write(json.dumps(entry) + "\n")
        response.headers["x-request-id"] = new_id("req_")
        return response

    async def inference(self, kind: str, request: web.Request) -> web.Response:
        cfg = self.config
        try:
            try:
                body = json.loads(await request.read())
            except ValueError:
                raise ApiError(
                    400, "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload."
                ) from None
            if not isinstance(body, dict):
                raise ApiError(400, "The request body must be a JSON object.")
            prep = prepare(kind, body)
            request[MARKER] = prep.marker
            if cfg.insufficient_quota:
                raise ApiError(
                    429,
                    "You exceeded your current quota, please check your plan and billing details.",
                    "insufficient_quota",
                    "insufficient_quota",
                )
            injected = self.errors.draw()
            if injected == 429:
                request[RETRY_AFTER_MS] = cfg.retry_after_ms
                seconds = str(max(1, math.ceil(cfg.retry_after_ms / 1000)))
                return json_response(
                    429,
                    injected_error(429).body(),
                    {"retry-after": seconds, "retry-after-ms": str(cfg.retry_after_ms)},
                )
            headers = self.limiter.take(prep.rate_charge(cfg.token_count), body["model"])
        except RateLimited as e:
            if not math.isinf(e.wait):
                request[RETRY_AFTER_MS] = math.ceil(e.wait * 1000)
            return json_response(429, e.body(), e.headers)
        except ApiError as e:
            return json_response(e.status, e.body())
        delay = cfg.latency_ms + (self._jitter_rng.uniform(0, cfg.jitter_ms) if cfg.jitter_ms else 0)
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if injected is not None:
            return json_response(injected, injected_error(injected).body(), headers)
        status, payload = respond(kind, body, prep, self.bad_outputs)
        return json_response(status, payload, headers)

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "batchsite-simulator"} for m in MODELS]
        return json_response(200, {"object": "list", "data": data})

    async def get_config(self, request: web.Request) -> web.Response:
        return json_response(200, dataclasses.asdict(self.config))

    async def set_config(self, request: web.Request) -> web.Response:
        """Change settings at runtime; rate-limit windows and error generators restart."""
        try:
            changes = json.loads(await request.read())
        except ValueError:
            raise ApiError(400, "The body must be a JSON object.") from None
        for key, value in changes.items():
            if key == "error_rates":
                self.config.error_rates = {int(k): float(v) for k, v in value.items()}
            elif key in RUNTIME_KEYS:
                setattr(self.config, key, None if value is None else RUNTIME_KEYS[key](value))
            else:
                raise ApiError(400, f"Unknown setting {key!r}.", param=key)
        self.reset_limits()
        return json_response(200, dataclasses.asdict(self.config))

    async def reset_route(self, request: web.Request) -> web.Response:
        self.reset()
        return json_response(200, {"reset": True})

    async def stats(self, request: web.Request) -> web.Response:
        return json_response(
            200,
            {
                "total": self.total,
                "by_path": dict(self.by_path),
                "by_status": {str(k): v for k, v in self.by_status.items()},
                "rate_limited": self.rate_limited,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "first_arrival": self.first_arrival,
                "retries_checked": self.retry_audit.checked,
                "retry_after_violations": len(self.retry_audit.violations),
                "retry_after_violation_details": self.retry_audit.violations[:20],
                "batch_peak_enqueued_tokens": self.batches.peak_enqueued_tokens,
                "bad_outputs": self.bad_outputs.count,
            },
        )

    async def log_route(self, request: web.Request) -> web.Response:
        entries = list(self.log)
        if "limit" in request.query:
            entries = entries[-int(request.query["limit"]) :]
        return json_response(200, entries)


SIMULATOR = web.AppKey("simulator", Simulator)


def make_app(config: SimConfig | None = None) -> web.Application:
    sim = Simulator(config or SimConfig())
    app = web.Application(middlewares=[sim.middleware, api_errors], client_max_size=MAX_FILE_BYTES + 1024 * 1024)
    app[SIMULATOR] = sim
    add = app.router.add_route
    for path, kind in INFERENCE_ROUTES.items():
        add("POST", path, functools.partial(sim.inference, kind))
    add("GET", "/v1/models", sim.models)
    add("POST", "/v1/files", sim.files.create_file)
    add("GET", "/v1/files", sim.files.list_files)
    add("GET", "/v1/files/{file_id}", sim.files.get_file)
    add("GET", "/v1/files/{file_id}/content", sim.files.file_content)
    add("DELETE", "/v1/files/{file_id}", sim.files.delete_file)
    add("POST", "/v1/batches", sim.batches.create_batch)
    add("GET", "/v1/batches", sim.batches.list_batches)
    add("GET", "/v1/batches/{batch_id}", sim.batches.get_batch)
    add("POST", "/v1/batches/{batch_id}/cancel", sim.batches.cancel_batch)
    add("GET", "/_sim/stats", sim.stats)
    add("GET", "/_sim/log", sim.log_route)
    add("GET", "/_sim/config", sim.get_config)
    add("POST", "/_sim/config", sim.set_config)
    add("POST", "/_sim/reset", sim.reset_route)
    add("POST", "/_sim/batches/finish", sim.batches.finish_route)

    app.on_cleanup.append(lambda app: sim.close())
    return app


def run(config: SimConfig, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Serve in the foreground until interrupted."""
    web.run_app(make_app(config), host=host, port=port, access_log=None, print=None)


@contextlib.contextmanager
def serve_in_thread(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the simulator on its own event loop in a daemon thread; yields its base URL (".../v1")."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(config), access_log=None)
    ready = threading.Event()
    started: dict = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
            started["port"] = runner.addresses[0][1]
        except BaseException as e:  # reported to the caller's thread below
            started["error"] = e
            ready.set()
            loop.close()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=main, name="openai-simulator", daemon=True)
    thread.start()
    ready.wait(30)
    if "port" not in started:
        raise RuntimeError("simulator did not start") from started.get("error")
    try:
        yield f"http://{host}:{started['port']}/v1"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
