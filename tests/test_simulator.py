"""The built-in OpenAI simulator, driven over real HTTP by the real openai SDK."""

import asyncio
import base64
import contextlib
import json
import re
import struct
import time
import urllib.error
import urllib.request
from typing import Literal

import openai
import pydantic
import pytest

from jobs.engine.schemacheck import problem, wanted
from simulator import SimConfig, go_duration, serve_in_thread

MODEL = "gpt-4o-mini"
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")
TERMINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture
def start():
    """start(**SimConfig fields) -> base URL of a fresh simulator, stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **config: stack.enter_context(serve_in_thread(SimConfig(**config)))


@pytest.fixture
def url(start):
    return start(batch_seconds=0.3)


def client(url, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=kwargs.pop("api_key", "sk-test"), max_retries=0, **kwargs)


def admin(url, path, payload=None):
    """GET (or POST `payload` as JSON to) one of the simulator's /_sim routes."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(
        url.removesuffix("/v1") + path, data=data, method="GET" if data is None else "POST"
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def post_raw(url, path, body: bytes):
    """POST bytes as-is: (status, JSON body)."""
    request = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def ask(c, text, **kwargs):
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kwargs)


def chat_line(custom_id, text, url="/v1/chat/completions", model=MODEL):
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def run_batch(c, lines, poll=None, **create):
    """Upload JSONL lines, create a chat batch, poll until it ends (calling poll(batch) each time)."""
    upload = c.files.create(file=("input.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = c.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", **create
    )
    assert batch.status == "validating"
    deadline = time.monotonic() + 10
    while batch.status not in TERMINAL:
        assert time.monotonic() < deadline, batch
        time.sleep(0.02)
        batch = c.batches.retrieve(batch.id)
        if poll:
            poll(batch)
    return batch


def jsonl(c, file_id):
    return [json.loads(line) for line in c.files.content(file_id).text.splitlines()] if file_id else []


def test_chat_echoes_last_user_message_with_usage(url):
    c = client(url)
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        ],
    )
    answer = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_")
    assert answer.choices[0].message.content == "Echo: part one\npart two"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == MODEL
    assert answer.usage.prompt_tokens > 1
    assert answer.usage.completion_tokens == len("Echo: part one\npart two") // 4 + 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens_details.cached_tokens == 0


def test_async_client_gets_each_item_its_own_answer(url):
    async def main():
        async with openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0) as c:
            prompts = [f"item {i}" for i in range(50)]
            answers = await asyncio.gather(
                *(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}]) for p in prompts)
            )
            return prompts, [a.choices[0].message.content for a in answers]

    prompts, contents = asyncio.run(main())
    assert contents == [f"Echo: {p}" for p in prompts]


class Address(pydantic.BaseModel):
    city: str
    zip_code: str | None


class Person(pydantic.BaseModel):
    name: str
    age: int
    score: float
    active: bool
    role: Literal["admin", "member"]
    tags: list[str]
    address: Address


def test_structured_output_is_valid_for_the_schema(url):
    c = client(url)
    parsed = (
        c.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": "Describe Ada"}], response_format=Person
        )
        .choices[0]
        .message.parsed
    )
    assert isinstance(parsed, Person)  # the SDK validated it against the pydantic model
    assert parsed.name == "Echo: Describe Ada"
    assert parsed.role == "admin"
    assert parsed.tags == ["Echo: Describe Ada"]
    assert parsed.address.city == "Echo: Describe Ada"

    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["spam", "ham"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "count": {"type": ["integer", "null"]},
            "items": {"type": "array", "items": {"type": "object", "properties": {"ok": {"type": "boolean"}}}},
        },
        "required": ["label", "confidence", "count", "items"],
        "additionalProperties": False,
    }
    content = (
        ask(
            c,
            "classify",
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}},
        )
        .choices[0]
        .message.content
    )
    assert json.loads(content) == {"label": "spam", "confidence": 1.0, "count": 1, "items": [{"ok": True}]}


def test_embeddings_are_deterministic_per_input(url):
    c = client(url)
    first = c.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    again = c.embeddings.create(model="text-embedding-3-small", input="beta")
    assert [d.index for d in first.data] == [0, 1]
    assert len(first.data[0].embedding) == 8
    assert first.data[0].embedding != first.data[1].embedding
    assert again.data[0].embedding == first.data[1].embedding
    assert abs(sum(v * v for v in first.data[0].embedding) - 1) < 1e-6  # unit length, like OpenAI's
    assert first.usage.prompt_tokens > 0

    wide = c.embeddings.create(model="text-embedding-3-small", input="beta", dimensions=32, encoding_format="base64")
    vector = struct.unpack("<32f", base64.b64decode(wide.data[0].embedding))
    assert len(vector) == 32


def test_responses_api_parses_with_the_sdk(url):
    c = client(url)
    response = c.responses.create(model=MODEL, input="What is 2+2?", instructions="Answer briefly.")
    assert response.output_text == "Echo: What is 2+2?"
    assert response.status == "completed"
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens

    listed = c.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "from a list"}]},
        ],
    )
    assert listed.output_text == "Echo: from a list"

    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    structured = c.responses.create(
        model=MODEL,
        input="structured please",
        text={
            "format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True},
        },
    )
    assert json.loads(structured.output_text) == {"answer": "Echo: structured please"}


def test_completions_echo_each_prompt(url):
    answer = client(url).completions.create(model=MODEL, prompt=["one", "two"])
    assert [(ch.index, ch.text) for ch in answer.choices] == [(0, "Echo: one"), (1, "Echo: two")]


def test_rpm_limit_answers_429_with_retry_after(start):
    url = start(rpm=60)
    c = client(url)
    ok, limited, started = 0, [], time.monotonic()
    for i in range(70):
        try:
            ask(c, f"burst {i}")
            ok += 1
        except openai.RateLimitError as e:
            limited.append(e)
    assert 60 <= ok <= 61 + time.monotonic() - started  # the bucket holds 60 and refills one per second
    assert len(limited) == 70 - ok
    error = limited[0]
    assert error.code == "rate_limit_exceeded"
    assert 0 < int(error.response.headers["retry-after-ms"]) <= 1000
    assert error.response.headers["retry-after"] == "1"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert admin(url, "/_sim/stats")["rate_limited"] == len(limited)
    assert admin(url, "/_sim/log")[-1]["retry_after_ms"] > 0


def test_rejected_requests_do_not_consume_budget(start):
    c = client(start(rpm=60))
    for _ in range(60):
        ask(c, "fill")
    for _ in range(30):
        with pytest.raises(openai.RateLimitError) as caught:
            ask(c, "rejected")
    wait_ms = int(caught.value.response.headers["retry-after-ms"])
    assert wait_ms <= 1000  # one refill away (1 request/s), however many were turned away
    time.sleep(wait_ms / 1000 + 0.05)
    assert ask(c, "admitted after the advertised wait").choices[0].message.content.startswith("Echo")


def test_start_empty_buckets_admit_only_the_refill_rate(start):
    """With start_empty the first request finds no budget, and from then on only what has refilled is
    admitted: a client faster than its limit is caught at once, not after a minute's budget."""
    url = start(rpm=600, tpm=60_000, start_empty=True)
    c = client(url)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(c, "first")
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < int(caught.value.response.headers["retry-after-ms"]) <= 100  # one request refills in 0.1 s
    admitted, started = 0, time.monotonic()
    while time.monotonic() - started < 1.0:
        try:
            ask(c, "as fast as possible")
            admitted += 1
        except openai.RateLimitError:
            pass
    assert 8 <= admitted <= 11  # 10 requests/s, not the 600 a full bucket holds
    assert admin(url, "/_sim/config")["start_empty"] is True


def test_ratelimit_headers_count_down(start):
    c = client(start(rpm=100, tpm=10_000))
    seen = []
    for _ in range(3):
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "x" * 400}], max_tokens=100
        )
        seen.append(raw.headers)
    assert [h["x-ratelimit-limit-requests"] for h in seen] == ["100"] * 3
    assert [int(h["x-ratelimit-remaining-requests"]) for h in seen] == [99, 98, 97]
    tokens = [int(h["x-ratelimit-remaining-tokens"]) for h in seen]
    cost = -(-400 // 4) + 100  # a token per 4 characters (as OpenAI estimates) + max_tokens; ~167/s refill
    assert tokens[0] == 10_000 - cost
    assert all(cost - 30 <= before - after <= cost for before, after in zip(tokens, tokens[1:])), tokens
    for h in seen:
        assert GO_DURATION.match(h["x-ratelimit-reset-requests"]), h["x-ratelimit-reset-requests"]
        assert GO_DURATION.match(h["x-ratelimit-reset-tokens"]), h["x-ratelimit-reset-tokens"]


def test_tpm_limit_counts_prompt_and_max_tokens(start):
    c = client(start(tpm=1000))
    ask(c, "small", max_tokens=600)
    with pytest.raises(openai.RateLimitError) as caught:
        ask(c, "small", max_tokens=600)
    assert caught.value.type == "tokens"
    assert 0 < int(caught.value.response.headers["retry-after-ms"]) <= 60_000
    with pytest.raises(openai.RateLimitError) as too_large:
        ask(c, "huge", max_tokens=5000)
    assert "Request too large" in too_large.value.message
    assert "retry-after" not in too_large.value.response.headers  # waiting would not help


@pytest.mark.parametrize("token_count", ["chars", "tokenizer"])
def test_tpm_charges_a_prompt_by_the_chosen_rule_and_max_tokens_times_n(start, token_count):
    """OpenAI's limiter estimates a prompt at a token per four characters; a server that tokenizes counts it
    exactly. Either way, the whole output budget of every choice is charged when the request arrives."""
    from simulator.tokenizer import count_tokens

    c = client(start(tpm=1_000_000, token_count=token_count))
    text = "Summarise the plot of The Matrix in three sentences, for a reader who has never seen it. " * 7
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": text}], max_tokens=50, n=2
    )
    prompt = -(-len(text) // 4) if token_count == "chars" else count_tokens(text)
    assert prompt != (count_tokens(text) if token_count == "chars" else -(-len(text) // 4))  # the rules differ
    charged = 1_000_000 - int(raw.headers["x-ratelimit-remaining-tokens"])
    assert prompt + 100 <= charged <= prompt + 102  # and what refilled in between: a few tokens


def test_go_duration_format():
    assert [go_duration(s) for s in (0, 0.0121, 1, 1.5, 360, 3725)] == ["0s", "13ms", "1s", "1.5s", "6m0s", "1h2m5s"]


def test_injected_errors_follow_the_seed(start):
    url = start(error_rates={500: 0.2, 503: 0.1, 429: 0.05}, retry_after_ms=250, seed=7)
    c = client(url)

    def statuses():
        counts, first = {}, {}
        for i in range(400):
            try:
                ask(c, f"q{i}")
                status = 200
            except openai.APIStatusError as e:
                status = e.status_code
                first.setdefault(status, e)
            counts[status] = counts.get(status, 0) + 1
        return counts, first

    counts, first = statuses()
    assert 50 <= counts[500] <= 110  # 20% of 400, give or take
    assert 15 <= counts[503] <= 65
    assert 5 <= counts[429] <= 40
    assert first[500].type == "server_error"
    assert first[503].type == "server_error"
    assert first[429].response.headers["retry-after-ms"] == "250"
    assert first[429].response.headers["retry-after"] == "1"

    admin(url, "/_sim/reset", {})
    assert statuses()[0] == counts  # same seed, same number of requests: same errors


def test_insufficient_quota_is_a_distinct_429(start):
    url = start()
    admin(url, "/_sim/config", {"insufficient_quota": True})
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client(url), "anything")
    assert caught.value.code == "insufficient_quota"
    assert caught.value.type == "insufficient_quota"
    assert "retry-after" not in caught.value.response.headers


def test_api_key_is_checked(start):
    url = start(api_key="sk-right")
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(client(url, api_key="sk-wrong"), "hi")
    assert caught.value.code == "invalid_api_key"
    assert caught.value.type == "invalid_request_error"
    assert ask(client(url, api_key="sk-right"), "hi").choices[0].message.content == "Echo: hi"


def test_bad_requests_get_openai_errors(url):
    c = client(url)
    with pytest.raises(openai.BadRequestError) as missing:
        c.chat.completions.create(model=MODEL, messages=[])
    assert missing.value.param == "messages"
    with pytest.raises(openai.NotFoundError) as unknown:
        c.chat.completions.create(model="bad-model", messages=[{"role": "user", "content": "x"}])
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        ask(c, "please SIMULATE_400 here")
    with pytest.raises(openai.InternalServerError):
        ask(c, "please SIMULATE_500 here")

    status, body = post_raw(url, "/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post_raw(url, "/chat/completions", json.dumps({"messages": []}).encode())
    assert status == 400 and "model" in body["error"]["message"]
    status, body = post_raw(url, "/no/such/route", b"{}")
    assert status == 404 and body["error"]["type"] == "invalid_request_error"


def test_latency_is_concurrent_and_stats_count_in_flight(start):
    url = start(latency_ms=200)

    async def main():
        async with openai.AsyncOpenAI(base_url=url, api_key="sk-test", max_retries=0) as c:
            started = time.monotonic()
            await asyncio.gather(
                *(
                    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"n{i}"}])
                    for i in range(20)
                )
            )
            return time.monotonic() - started

    elapsed = asyncio.run(main())
    assert 0.2 <= elapsed < 1.0  # 20 requests overlapped, not 20 x 200 ms
    stats = admin(url, "/_sim/stats")
    assert stats["total"] == 20 and stats["by_status"] == {"200": 20}
    assert stats["by_path"] == {"/v1/chat/completions": 20}
    assert stats["max_in_flight"] >= 10 and stats["in_flight"] == 0
    log = admin(url, "/_sim/log")
    assert sorted(e["marker"] for e in log) == sorted(f"n{i}" for i in range(20))

    admin(url, "/_sim/reset", {})
    assert admin(url, "/_sim/stats")["total"] == 0
    assert admin(url, "/_sim/log") == []


def test_log_file_gets_one_line_per_request(start, tmp_path):
    path = tmp_path / "sim.jsonl"
    c = client(start(log_path=str(path)))
    ask(c, "a" * 300)
    c.embeddings.create(model="text-embedding-3-small", input="vector me")
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["path"], e["status"], e["marker"]) for e in entries] == [
        ("/v1/chat/completions", 200, "a" * 100),
        ("/v1/embeddings", 200, "vector me"),
    ]
    assert entries[0]["t"] <= entries[1]["t"]


def test_batch_runs_end_to_end_through_the_sdk(url):
    c = client(url)
    lines = [chat_line(f"item-{i}", f"question {i}") for i in range(30)] + [chat_line("bad", "SIMULATE_400")]
    statuses = []
    batch = run_batch(c, lines, poll=lambda b: statuses.append(b.status), metadata={"job": "42"})

    assert batch.status == "completed"
    assert "in_progress" in statuses and "finalizing" in statuses
    assert batch.metadata == {"job": "42"}
    assert batch.model == MODEL
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (31, 30, 1)
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at

    outputs = jsonl(c, batch.output_file_id)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"item-{i}" for i in range(30))
    for o in outputs:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200
        number = o["custom_id"].split("-")[1]
        assert o["response"]["body"]["choices"][0]["message"]["content"] == f"Echo: question {number}"
    [failed] = jsonl(c, batch.error_file_id)
    assert failed["custom_id"] == "bad"
    assert failed["response"]["status_code"] == 400 and "error" in failed["response"]["body"]

    assert c.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert batch.input_file_id in [f.id for f in c.files.list(purpose="batch")]
    assert c.files.delete(batch.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(batch.input_file_id)


def test_batches_list_pages_newest_first(url):
    c = client(url)
    upload = c.files.create(file=("input.jsonl", (chat_line("a", "x") + "\n").encode()), purpose="batch")
    ids = [
        c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(3)
    ]
    first = c.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[:0:-1] and first.has_more
    assert [b.id for b in c.batches.list(limit=2, after=first.data[-1].id).data] == ids[:1]
    assert [b.id for b in c.batches.list(limit=2)] == ids[::-1]


def test_batch_with_invalid_lines_fails_with_line_numbers(url):
    c = client(url)
    lines = [
        chat_line("ok", "fine"),
        "{not json",
        chat_line("wrong-url", "x", url="/v1/embeddings"),
        chat_line("ok", "duplicate"),
        chat_line("other-model", "x", model="gpt-4o"),
    ]
    batch = run_batch(c, lines)
    assert batch.status == "failed" and batch.failed_at
    assert [(e.line, e.code) for e in batch.errors.data] == [
        (2, "invalid_json_line"),
        (3, "invalid_url"),
        (4, "duplicate_custom_id"),
        (5, "mismatched_model"),
    ]
    assert batch.output_file_id is None


def test_batch_line_failures_go_to_the_error_file(start):
    c = client(start(batch_seconds=0.3, batch_fail_rate=0.5, seed=3))
    batch = run_batch(c, [chat_line(f"i{i}", f"q{i}") for i in range(40)])
    failed = jsonl(c, batch.error_file_id)
    assert batch.status == "completed"
    assert 8 <= len(failed) == batch.request_counts.failed <= 32
    assert len(jsonl(c, batch.output_file_id)) == batch.request_counts.completed == 40 - len(failed)
    assert {f["response"]["status_code"] for f in failed} == {500}
    assert {f["response"]["body"]["error"]["type"] for f in failed} == {"server_error"}


def test_cancelled_batch_keeps_partial_output(start):
    url = start(batch_seconds=2)
    c = client(url)
    cancelled = []

    def cancel_once_started(batch):
        if batch.status == "in_progress" and batch.request_counts.completed and not cancelled:
            cancelled.append(c.batches.cancel(batch.id))

    batch = run_batch(c, [chat_line(f"i{i}", f"q{i}") for i in range(100)], poll=cancel_once_started)
    assert cancelled[0].status == "cancelling" and cancelled[0].cancelling_at
    assert batch.status == "cancelled" and batch.cancelled_at
    outputs = jsonl(c, batch.output_file_id)
    assert 0 < len(outputs) == batch.request_counts.completed < 100
    assert c.batches.cancel(batch.id).status == "cancelled"  # cancelling again is harmless

    admin(url, "/_sim/config", {"batch_seconds": 0.2})
    finished = run_batch(c, [chat_line("a", "b")])
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(finished.id)


def test_expired_batch_returns_the_rest_as_batch_expired(start):
    c = client(start(batch_seconds=0.3, batch_expire=True))
    batch = run_batch(c, [chat_line(f"i{i}", f"q{i}") for i in range(10)])
    assert batch.status == "expired" and batch.expired_at
    done, expired = jsonl(c, batch.output_file_id), jsonl(c, batch.error_file_id)
    assert len(done) == 5 and len(expired) == 5
    assert {o["custom_id"] for o in done} | {e["custom_id"] for e in expired} == {f"i{i}" for i in range(10)}
    assert all(e["response"] is None and e["error"]["code"] == "batch_expired" for e in expired)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 5)


def test_retries_that_come_before_their_retry_after_are_reported(start):
    """Per request (a hash of its body), the time from a 429's answer to the next arrival is checked
    against the retry-after-ms the 429 gave; /_sim/stats counts and lists the retries that were early."""
    url = start(error_rates={429: 1.0}, retry_after_ms=300)
    c = client(url)
    for text in ("early", "patient", "other"):
        with pytest.raises(openai.RateLimitError):
            ask(c, text)
    with pytest.raises(openai.RateLimitError):
        ask(c, "early")  # at once: too soon
    time.sleep(0.35)
    with pytest.raises(openai.RateLimitError):
        ask(c, "patient")  # after the wait
    stats = admin(url, "/_sim/stats")
    assert (stats["retries_checked"], stats["retry_after_violations"]) == (2, 1)
    (early,) = stats["retry_after_violation_details"]
    assert early["marker"] == "early" and early["retry_after_ms"] == 300 and early["gap_ms"] < 300
    admin(url, "/_sim/reset", {})
    assert admin(url, "/_sim/stats")["retry_after_violations"] == 0


def test_first_arrival_is_reported_for_start_up_benches(start):
    url = start()
    assert admin(url, "/_sim/stats")["first_arrival"] is None
    before = time.time()
    ask(client(url), "hello")
    assert before <= admin(url, "/_sim/stats")["first_arrival"] <= time.time()


# A typical structured-output schema: strict mode, every property required.
TICKET = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "priority": {"type": "string", "enum": ["low", "high"]},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "priority", "score", "tags"],
    "additionalProperties": False,
}
TICKET_FORMAT = {"type": "json_schema", "json_schema": {"name": "ticket", "schema": TICKET, "strict": True}}


def check(url, path, body, data):
    """schemacheck's verdict on one answer, as the engine would give it."""
    want = wanted(url + path, body)
    assert want is not None
    return problem(want, url + path, data)


def test_bad_output_rate_breaks_a_fraction_of_structured_answers(start):
    url = start(bad_output_rate=0.5, seed=3)
    c = client(url)

    def structured(n, response_format=TICKET_FORMAT):
        verdicts = []
        for i in range(n):
            answer = ask(c, f"ticket {i}", response_format=response_format)
            choice = answer.choices[0]
            assert answer.usage.completion_tokens == len(choice.message.content) // 4 + 1  # counts the text sent
            verdict = check(url, "/chat/completions", {"response_format": response_format}, answer.model_dump())
            # only a cut answer says it was cut
            assert (choice.finish_reason == "length") == bool(verdict and "not valid JSON" in verdict)
            verdicts.append(verdict)
        return verdicts

    verdicts = structured(40)
    bad = [v for v in verdicts if v]
    assert 12 <= len(bad) <= 28  # half of 40, give or take
    assert any("not valid JSON" in v for v in bad) and any("breaks the schema" in v for v in bad)
    assert admin(url, "/_sim/stats")["bad_outputs"] == len(bad)

    objects = [v for v in structured(10, {"type": "json_object"}) if v]
    assert objects and any("not an object" in v for v in objects)  # an array instead of an object
    assert admin(url, "/_sim/stats")["bad_outputs"] == len(bad) + len(objects)

    for i in range(20):  # free text is never touched, and draws nothing
        assert ask(c, f"plain {i}").choices[0].message.content == f"Echo: plain {i}"
    assert admin(url, "/_sim/stats")["bad_outputs"] == len(bad) + len(objects)

    admin(url, "/_sim/reset", {})  # same seed, same requests: the same answers broken
    assert structured(40) == verdicts

    admin(url, "/_sim/config", {"bad_output_rate": 0})
    assert not any(structured(20))
    assert admin(url, "/_sim/stats")["bad_outputs"] == len(bad)


def test_bad_outputs_reach_the_responses_api_and_batches(start):
    url = start(bad_output_rate=1.0, batch_seconds=0.3)
    c = client(url)
    fmt = {"type": "json_schema", "name": "ticket", "schema": TICKET, "strict": True}
    verdicts = []
    for i in range(2):  # broken answers alternate: first cut short, then off the schema
        response = c.responses.create(model=MODEL, input=f"ticket {i}", text={"format": fmt})
        assert response.status == "completed"
        assert response.usage.output_tokens == len(response.output_text) // 4 + 1
        verdicts.append(check(url, "/responses", {"text": {"format": fmt}}, response.model_dump()))
    assert "not valid JSON" in verdicts[0] and "breaks the schema" in verdicts[1]

    body = {"model": MODEL, "messages": [{"role": "user", "content": "t"}], "response_format": TICKET_FORMAT}
    lines = [
        json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        for i in range(2)
    ]
    batch = run_batch(c, lines)
    assert batch.status == "completed"
    outputs = jsonl(c, batch.output_file_id)
    assert all(check(url, "/chat/completions", body, o["response"]["body"]) for o in outputs)
    assert admin(url, "/_sim/stats")["bad_outputs"] == 4
