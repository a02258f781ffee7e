"""The Batches API (/v1/batches): create, poll, list and cancel batches, and the background task that
takes each through OpenAI's lifecycle (validating -> in_progress -> finalizing -> completed, or failed,
expired, cancelled) in SimConfig.batch_seconds, answering its lines as the live routes would.

SimConfig's batch_* settings shape that run: how long it takes, what fraction of lines fail (500) or
are refused (400), whether the batch expires half-way, fails validation, or passes its model's enqueued
token limit, and how long a cancelled batch stays `cancelling`. `_run` walks the stages; `_enqueue`
applies the token limit; `_answer_lines` answers the lines and `_store_results` writes the output and
error files.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import random
import time

from aiohttp import web

from simulator.answers import INFERENCE_ROUTES, BadOutputs, answer, new_id, prepare
from simulator.batch_input import rejection_errors, validate_batch_file
from simulator.config import SimConfig
from simulator.errors import ApiError, injected_error, json_response
from simulator.files import Files, page

_EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")
_ENQUEUED = ("validating", "in_progress", "finalizing")  # batches whose tokens count against the limit


def _estimated_tokens(kind: str, lines: list[dict]) -> int:
    """A batch's enqueued tokens, estimated as the live rate limiter does: prompt estimate + max output tokens."""
    total = 0
    for line in lines:
        try:
            prep = prepare(kind, line["body"])
        except ApiError:  # answered 4xx without running: enqueues nothing
            continue
        total += prep.prompt_tokens + prep.max_tokens
    return total


def _batch_usage(usage: collections.Counter) -> dict:
    input_tokens = usage["prompt_tokens"] + usage["input_tokens"]
    output_tokens = usage["completion_tokens"] + usage["output_tokens"]
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


class Batches:
    """The batches and their running tasks; its async methods are the /v1/batches handlers."""

    def __init__(self, config: SimConfig, files: Files, bad_outputs: BadOutputs | None = None):
        self.config, self.files = config, files
        self.bad_outputs = bad_outputs  # breaks a fraction of structured answers, as on the live routes
        self.by_id: dict[str, dict] = {}  # id -> batch object, in creation order
        self._tokens: dict[str, int] = {}  # id -> estimated tokens, for batches that passed validation
        self._tasks: set[asyncio.Task] = set()
        # id -> "complete" or "expire": the batch ends now (POST /_sim/batches/finish), not when its
        # batch_seconds are up, so a test controls when a batch ends instead of sleeping until it does.
        self._finish: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        """Batch failures and the order of output lines back at the start of their seeded sequence; the
        peak enqueued tokens forgotten."""
        self._rng = random.Random(f"{self.config.seed}:batch")
        # model -> the most tokens its running batches held at once (GET /_sim/stats), so a test can
        # check a client kept under batch_token_limit.
        self.peak_enqueued_tokens: dict[str, int] = {}

    async def close(self) -> None:
        """Stop the batches still running."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def finish_route(self, request: web.Request) -> web.Response:
        """POST /_sim/batches/finish {"outcome": "complete"|"expire", "ids": [...]}: the batches named (all
        that are running if none are) end at once: `complete` answers every line now, `expire` stops
        answering and expires the lines not answered yet, as OpenAI does at the end of the window."""
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise ApiError(400, 'The body is a JSON object: {"outcome": ..., "ids": [...]}.')
        outcome, ids = body.get("outcome", "complete"), body.get("ids")
        if outcome not in ("complete", "expire"):
            raise ApiError(400, "outcome is 'complete' or 'expire'.", param="outcome")
        if ids is not None and not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise ApiError(400, "ids is a list of batch ids.", param="ids")
        running = {i for i, b in self.by_id.items() if b["status"] in (*_ENQUEUED, "cancelling")}
        ids = ids or sorted(running)
        unknown = [i for i in ids if i not in self.by_id]
        if unknown:
            raise ApiError(404, f"No batch found with id '{unknown[0]}'.")
        for batch_id in ids:
            if batch_id in running:
                self._finish[batch_id] = outcome
        return json_response(200, {"finishing": [i for i in ids if i in running], "outcome": outcome})

    async def _pause(self, batch: dict, seconds: float) -> None:
        """Wait between stages or chunks of work, but notice a cancel or a finish within a tenth of a second (a
        cancel's settling time is SimConfig.batch_cancel_seconds, not the length of the pause it arrived in)."""
        end = time.monotonic() + seconds
        while batch["status"] != "cancelling" and batch["id"] not in self._finish:
            if (left := end - time.monotonic()) <= 0:
                return
            await asyncio.sleep(min(left, 0.1))

    async def _settle_cancel(self, batch: dict) -> None:
        """A cancelled batch stays `cancelling` for SimConfig.batch_cancel_seconds, unless told to finish."""
        end = time.monotonic() + self.config.batch_cancel_seconds
        while batch["id"] not in self._finish and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.1))

    def _batch(self, request: web.Request) -> dict:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.by_id:
            raise ApiError(404, f"No batch found with id '{batch_id}'.")
        return self.by_id[batch_id]

    async def create_batch(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise ApiError(400, "We could not parse the JSON body of your request.") from None
        input_file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        if not input_file_id:
            raise ApiError(
                400,
                "Missing required parameter: 'input_file_id'.",
                code="missing_required_parameter",
                param="input_file_id",
            )
        data = self.files.find(input_file_id, param="input_file_id")["data"]
        if endpoint not in INFERENCE_ROUTES:
            raise ApiError(
                400,
                f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: "
                + ", ".join(INFERENCE_ROUTES)
                + ".",
                code="invalid_value",
                param="endpoint",
            )
        if body.get("completion_window") != "24h":
            raise ApiError(
                400,
                "Invalid value for 'completion_window': only '24h' is supported.",
                code="invalid_value",
                param="completion_window",
            )
        now = int(time.time())
        batch = {
            "id": new_id("batch_"),
            "object": "batch",
            "endpoint": endpoint,
            "model": None,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "usage": None,
            "metadata": body.get("metadata"),
        }
        self.by_id[batch["id"]] = batch
        task = asyncio.get_running_loop().create_task(self._run(batch, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return json_response(200, batch)

    async def get_batch(self, request: web.Request) -> web.Response:
        return json_response(200, self._batch(request))

    async def list_batches(self, request: web.Request) -> web.Response:
        return json_response(200, page(list(reversed(self.by_id.values())), request.query, default_limit=20))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if batch["status"] in ("validating", "in_progress", "finalizing"):
            batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
        elif batch["status"] not in ("cancelling", "cancelled"):
            raise ApiError(409, f"Cannot cancel a batch with status '{batch['status']}'.")
        return json_response(200, batch)

    async def _run(self, batch: dict, data: bytes) -> None:
        """validating -> in_progress -> finalizing -> completed (or failed/expired/cancelled) over batch_seconds,
        or sooner when told to finish (finish_route)."""
        try:
            await self._stages(batch, data)
        finally:
            self._finish.pop(batch["id"], None)

    async def _stages(self, batch: dict, data: bytes) -> None:
        cfg = self.config
        step = cfg.batch_seconds / 10  # one step validating, eight processing, one finalizing
        await self._pause(batch, step)
        if batch["status"] == "cancelling":
            await self._settle_cancel(batch)
            batch["status"], batch["cancelled_at"] = "cancelled", int(time.time())
            return
        lines, errors = validate_batch_file(data, batch["endpoint"])
        if not errors and cfg.batch_reject:
            errors = rejection_errors(data)
        if not errors:
            errors = self._enqueue(batch, lines)
        if errors:
            batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": errors})
            return
        counts = batch["request_counts"]
        counts["total"] = len(lines)
        batch.update(status="in_progress", in_progress_at=int(time.time()), model=lines[0]["body"]["model"])
        todo = len(lines) // 2 if cfg.batch_expire else len(lines)
        outputs, failures, usage = await self._answer_lines(batch, lines[:todo], 8 * step)
        expire = cfg.batch_expire or self._finish.get(batch["id"]) == "expire"
        if batch["status"] != "cancelling" and not expire:
            batch.update(status="finalizing", finalizing_at=int(time.time()))
            await self._pause(batch, step)
        if batch["status"] == "cancelling":
            final = "cancelled"
            await self._settle_cancel(batch)
        elif expire:
            final = "expired"
            answered = counts["completed"] + counts["failed"]  # lines are answered in order
            for line in lines[answered:]:
                failures.append(
                    {
                        "id": new_id("batch_req_"),
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": _EXPIRED_ERROR,
                    }
                )
            counts["failed"] += len(lines) - answered
        else:
            final = "completed"
        self._store_results(batch, outputs, failures)
        batch["usage"] = _batch_usage(usage)
        batch["status"] = final
        batch[f"{final}_at"] = int(time.time())

    def _enqueue(self, batch: dict, lines: list[dict]) -> list[dict]:
        """Hold a validated batch's tokens against its model's enqueued token limit: the errors that fail
        the batch if they would pass it (nothing is held then)."""
        model, limit = lines[0]["body"]["model"], self.config.batch_token_limit
        tokens = _estimated_tokens(INFERENCE_ROUTES[batch["endpoint"]], lines)
        enqueued = tokens + sum(
            held
            for batch_id, held in self._tokens.items()
            if self.by_id[batch_id]["model"] == model and self.by_id[batch_id]["status"] in _ENQUEUED
        )
        if limit is not None and enqueued > limit:
            message = (
                f"Enqueued token limit reached for {model} in organization org-sim. Limit: {limit:,} enqueued "
                "tokens. Please try again once some in_progress batches have been completed."
            )
            return [{"code": "token_limit_exceeded", "line": None, "message": message, "param": None}]
        self._tokens[batch["id"]] = tokens
        self.peak_enqueued_tokens[model] = max(self.peak_enqueued_tokens.get(model, 0), enqueued)
        return []

    async def _answer_lines(self, batch: dict, lines: list[dict], seconds: float):
        """Answer `lines` over about `seconds`, stopping early if the batch is cancelled:
        (output results, error results, token usage), counted in the batch's request_counts."""
        cfg, counts, kind = self.config, batch["request_counts"], INFERENCE_ROUTES[batch["endpoint"]]
        todo = len(lines)
        # Small chunks keep the event loop (and live traffic) responsive; the pauses between them
        # add up to `seconds`.
        chunk = min(500, max(1, math.ceil(todo / 8)))
        pause = seconds / max(1, math.ceil(todo / chunk))
        outputs: list[dict] = []
        failures: list[dict] = []
        usage: collections.Counter[str] = collections.Counter()
        done = 0
        while done < todo and batch["status"] != "cancelling" and self._finish.get(batch["id"]) != "expire":
            for line in lines[done : min(todo, done + chunk)]:
                # One draw a line, so a seed fails the same lines whatever the client error rate.
                draw = self._rng.random()
                if draw < cfg.batch_fail_rate:
                    status, payload = 500, injected_error(500).body()
                elif draw < cfg.batch_fail_rate + cfg.batch_client_error_rate:
                    status, payload = 400, injected_error(400).body()
                else:
                    status, payload = answer(kind, line["body"], self.bad_outputs)
                result = {
                    "id": new_id("batch_req_"),
                    "custom_id": line["custom_id"],
                    "response": {"status_code": status, "request_id": new_id("req_"), "body": payload},
                    "error": None,
                }
                if status == 200:
                    outputs.append(result)
                    counts["completed"] += 1
                    for key in _USAGE_KEYS:
                        usage[key] += payload["usage"].get(key, 0)
                else:
                    failures.append(result)
                    counts["failed"] += 1
            done = min(todo, done + chunk)
            await self._pause(batch, pause)
        return outputs, failures, usage

    def _store_results(self, batch: dict, outputs: list[dict], failures: list[dict]) -> None:
        """Write the output and error files (each only if it has lines) and link them to the batch."""
        # OpenAI does not keep input order in its output files: shuffle so clients join on custom_id.
        self._rng.shuffle(outputs)
        self._rng.shuffle(failures)
        for key, results, suffix in (("output_file_id", outputs, "output"), ("error_file_id", failures, "error")):
            if results:
                content = "".join(json.dumps(r) + "\n" for r in results).encode()
                batch[key] = self.files.store(f"batch_{batch['id']}_{suffix}.jsonl", "batch_output", content)["id"]
