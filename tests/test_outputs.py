"""Structured output, checked (issue 14): every answer of a request that asks for JSON is parsed and
validated against its schema; a broken one is sent again up to the job's output_retries, then fails as
invalid_output with the raw answer kept. The rules alone, then a real qcluster against the simulator's
switch that breaks a fraction of structured answers."""

import contextlib
import json
import time
import urllib.request
from decimal import Decimal

import pytest

from jobs.engine import runner, schemacheck, upstream
from jobs.models import Item, Job, control
from jobs.pricing import PriceBook
from simulator import SimConfig, serve_in_thread
from simulator.answers import respond
from tests.factories import make_endpoint, make_job, seed_prices
from tests.test_engine_cluster import wait_status

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["sentiment", "confidence"],
    "additionalProperties": False,
}
CHAT = "/v1/chat/completions"


def chat_format(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "review", "schema": schema, "strict": True}}


def chat_answer(*texts) -> dict:
    return {"choices": [{"index": i, "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)]}


def check(texts, body=None, url=CHAT):
    want = schemacheck.wanted(url, body or {"response_format": chat_format()})
    return schemacheck.problem(want, url, chat_answer(*texts) if url == CHAT else texts)


def test_what_a_request_asks_for():
    assert schemacheck.wanted(CHAT, {"messages": []}) is None
    assert schemacheck.wanted(CHAT, {"response_format": {"type": "text"}}) is None
    assert schemacheck.wanted(CHAT, {"response_format": {"type": "json_object"}}) is not None
    assert schemacheck.wanted(CHAT, {"response_format": chat_format()}) is not None
    responses = {"text": {"format": {"type": "json_schema", "name": "r", "schema": SCHEMA}}}
    assert schemacheck.wanted("/v1/responses", responses) is not None
    assert schemacheck.wanted("/v1/responses", {"text": {"format": {"type": "text"}}}) is None
    assert schemacheck.wanted(CHAT, {"response_format": "json"}) is None  # not ours to judge


def test_answers_valid_invalid_json_and_schema_breaks_are_told_apart():
    assert check(['{"sentiment": "positive", "confidence": 0.9}']) is None
    assert "not valid JSON" in check(['{"sentiment": "positive", "confid'])
    assert check(['{"sentiment": "great", "confidence": 0.9}']).startswith("The answer breaks the schema at /sentiment")
    assert "at /:" in check(['{"sentiment": "positive"}'])  # a required property missing
    assert "no text" in check([None])  # a refusal
    # Every choice of n > 1 is checked.
    assert check(['{"sentiment": "positive", "confidence": 1}', '{"sentiment": 1, "confidence": 1}']).startswith(
        "Answer 2 breaks the schema"
    )
    json_object = {"response_format": {"type": "json_object"}}
    assert check(['{"anything": [1, 2]}'], json_object) is None
    assert "not an object" in check(["[1, 2]"], json_object)


def test_the_responses_api_answers_are_checked():
    body = {"text": {"format": {"type": "json_schema", "name": "r", "schema": SCHEMA}}}

    def response(text):
        return {"output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}]}

    assert check(response('{"sentiment": "neutral", "confidence": 0.5}'), body, "/v1/responses") is None
    assert "breaks the schema" in check(response('{"sentiment": "neutral"}'), body, "/v1/responses")


def test_hostile_schemas_and_answers_cost_nothing_and_reach_nowhere():
    # A remote $ref is not fetched (the schema cannot make this machine call another), and the answer is
    # then not judged against a schema we could not build.
    remote = {"$ref": "http://169.254.169.254/latest/meta-data/"}
    started = time.perf_counter()
    assert check(['{"a": 1}'], {"response_format": chat_format(remote)}) is None
    # A catastrophic-backtracking pattern runs in a linear-time engine.
    evil = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a+)+$"}}}
    assert "breaks the schema" in check([json.dumps({"a": "a" * 50_000 + "!"})], {"response_format": chat_format(evil)})
    # JSON nested past the parser's recursion limit is an invalid answer, not a crash.
    assert "nested too deeply" in check(["[" * 200_000 + "]" * 200_000])
    assert "not valid JSON" in check(['{"sentiment": "positive", "confidence": ' + "1" * 5000 + "}"])
    assert "NaN is not a JSON value" in check(['{"sentiment": "positive", "confidence": NaN}'])
    assert check(["[1]"], {"response_format": chat_format({})}) is None  # an empty schema takes anything
    # A body of another shape than documented is judged, never a crash (a crash would re-send, or stall a join).
    want = schemacheck.wanted(CHAT, {"response_format": chat_format()})
    for odd in ({"choices": [{"message": "hi"}]}, {"choices": 5}, [], {"choices": [{"message": {"content": 7}}]}):
        assert "no text" in schemacheck.problem(want, CHAT, odd)
    deep = json.dumps({"sentiment": "positive", "confidence": 1, "x": json.loads("[" * 300 + "]" * 300)})
    assert schemacheck.problem(want, CHAT, chat_answer(deep)) is not None
    assert time.perf_counter() - started < 2


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_broken_answers_are_sent_again_then_fail_as_invalid_output_with_the_raw_answer(
    cluster, simulator, write, owner
):
    sim = simulator("--latency-ms", "10", "--bad-output-rate", "0.4", "--seed", "3")
    cluster()
    n = 200
    job = make_job(write, owner, make_endpoint(sim.base_url), n, start=False, response_format=chat_format())
    Job.objects.filter(pk=job.pk).update(output_retries=2)
    job.start()
    wait_status(job, Job.Status.COMPLETED, 180)

    sends = {}
    for entry in sim.requests():
        sends[entry["marker"]] = sends.get(entry["marker"], 0) + 1
    bad = job.items.filter(status=Item.Status.FAILED)
    # At 40% broken, about 0.4^3 = 6% of the items get three broken answers in a row.
    assert 1 <= bad.count() <= 30 and job.n_succeeded == n - bad.count(), job.counts()
    for item in bad:
        assert item.error_code == "invalid_output" and item.http_status == 200
        assert "not valid JSON" in item.error_message or "breaks the schema" in item.error_message
        raw = json.loads(item.response)["choices"][0]["message"]["content"]
        assert schemacheck.problem(schemacheck.wanted(CHAT, json.loads(item.body)), CHAT, json.loads(item.response))
        assert raw is not None
        assert sends[f"Question {item.custom_id[4:]}"] == 3  # the first send and output_retries more
    for item in job.items.filter(status=Item.Status.SUCCEEDED):
        data = json.loads(item.response)
        assert schemacheck.problem(schemacheck.wanted(CHAT, json.loads(item.body)), CHAT, data) is None
    retried = job.items.filter(status=Item.Status.SUCCEEDED, attempts__gt=1)
    assert retried.count() >= 40  # about 40% needed a second send
    # Every broken answer was paid for: the job's tokens count every send.
    answered = sum(sends.values())
    assert answered == sum(job.items.values_list("attempts", flat=True))
    assert job.completion_tokens > 0 and job.prompt_tokens >= answered  # at least a token per send

    groups = {(g["error_code"]) for g in job.items.filter(status=Item.Status.FAILED).values("error_code")}
    assert groups == {"invalid_output"}


@pytest.mark.django_db
@pytest.mark.usefixtures("data_dir")
def test_v1_metadata_sets_the_retries_for_invalid_json(client, owner):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.factories import api_headers, chat_line, jsonl

    make_endpoint("http://127.0.0.1:9/v1")
    headers = api_headers(owner)
    content = jsonl([chat_line("a", response_format=chat_format())])

    def create(metadata):
        file = client.post(
            "/v1/files", {"file": SimpleUploadedFile("in.jsonl", content), "purpose": "batch"}, headers=headers
        ).json()
        body = {"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h", "metadata": metadata}
        return client.post("/v1/batches", body, content_type="application/json", headers=headers)

    for bad in ("-1", "11", "two", "²"):
        response = create({"batchsite_output_retries": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "metadata.batchsite_output_retries"
    assert Job.objects.count() == 0
    assert create({"batchsite_output_retries": "0"}).status_code == 200
    assert create({}).status_code == 200
    assert list(Job.objects.order_by("pk").values_list("output_retries", flat=True)) == [0, 2]


def _paid(answers: list[dict]) -> tuple[int, int, Decimal]:
    """(prompt tokens, completion tokens, cost) of answers the simulator served."""
    book = PriceBook.load()
    usage = [upstream.usage_of(CHAT, a) for a in answers]
    cost = sum((book.cost(a["model"], *u) for a, u in zip(answers, usage, strict=True)), Decimal(0))
    return sum(u[0] for u in usage), sum(u[1] for u in usage), cost


LONG = lambda i: "Question " + "long " * 200  # noqa: E731  a cost well above the job's last digit


@pytest.fixture
def rejected_then_handed_back(write, owner, settings, monkeypatch):
    """rejected_then_handed_back(handback) -> (job, every answer served): a job of one structured request, run
    in this process against the simulator. Its first answer breaks the schema, and the send meant to replace
    it is handed back: "paused", the endpoint runs out of quota (the job pauses); "retry_later", a 429 whose
    Retry-After outlasts the slice. Then the simulator answers well."""
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    monkeypatch.setattr("jobs.queue.send_notifications_on_commit", lambda *a, **k: None)
    seed_prices()
    settings.BATCHSITE_SLICES_PER_JOB = 1
    servers = contextlib.ExitStack()

    def start(handback: str, use_cache: bool = False) -> tuple[Job, list[dict]]:
        if handback == "paused":
            config = SimConfig(bad_output_rate=1.0)
        else:  # seed 8: the first request passes, the second gets the 429
            config = SimConfig(bad_output_rate=1.0, error_rates={429: 0.5}, retry_after_ms=3000, seed=8)
        served: list[dict] = []

        def recording(kind, body, prep, bad=None):
            status, payload = respond(kind, body, prep, bad)
            served.append(payload)
            if handback == "paused" and len(served) == 1:
                config.insufficient_quota = True  # the account runs dry right after the first answer
            return status, payload

        monkeypatch.setattr("simulator.server.respond", recording)
        base_url = servers.enter_context(serve_in_thread(config))
        job = make_job(write, owner, make_endpoint(base_url), 1, text=LONG, start=False, response_format=chat_format())
        Job.objects.filter(pk=job.pk).update(output_retries=2, use_cache=use_cache)
        Job.start_slices(job.pk)
        runner.run(job.pk, budget=1, slices=1)

        job.refresh_from_db()
        item = job.items.get()
        assert item.status == Item.Status.PENDING and len(served) == 1, (job.counts(), job.status_reason)
        assert schemacheck.problem(schemacheck.wanted(CHAT, json.loads(item.body)), CHAT, served[0])
        assert job.status == (Job.Status.PAUSED if handback == "paused" else Job.Status.RUNNING)
        # Handed back, the rejected answer is counted already: on the item, and in the job's cost, which the
        # cost cap and the monthly limits check the next claim against.
        prompt, completion, cost = _paid(served)
        assert cost > Decimal("0.00001")
        assert (item.prompt_tokens, item.completion_tokens) == (prompt, completion)
        assert abs(item.cost - cost) < Decimal("0.00000002") and abs(job.cost - cost) < Decimal("0.000002")
        assert (job.prompt_tokens, job.completion_tokens) == (prompt, completion)

        settle = {"bad_output_rate": 0, "insufficient_quota": False}  # also restarts the seeded errors: no 429
        request = urllib.request.Request(base_url.removesuffix("/v1") + "/_sim/config", json.dumps(settle).encode())
        request.add_header("content-type", "application/json")
        urllib.request.urlopen(request, timeout=10).close()
        return job, served

    with servers:
        yield start


def _run_to_the_end(job: Job) -> Job:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        runner.run(job.pk, budget=1, slices=1)
        job.refresh_from_db()
        if job.is_finished:
            return job
    raise AssertionError(job.counts())


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("handback", ["paused", "retry_later"])
def test_a_rejected_answer_stays_paid_for_when_its_item_is_handed_back_then_finished(
    handback, rejected_then_handed_back
):
    """The job's cost is every answer the simulator served, and the item's tokens include the rejected one,
    counted once although the item was handed back in between."""
    job, served = rejected_then_handed_back(handback)
    if job.status == Job.Status.PAUSED:
        control.resume(job)
    job = _run_to_the_end(job)

    item = job.items.get()
    assert (job.status, item.status, len(served)) == (Job.Status.COMPLETED, Item.Status.SUCCEEDED, 2)
    assert json.loads(item.response)["usage"] == served[1]["usage"]
    prompt, completion, cost = _paid(served)
    assert (item.prompt_tokens, item.completion_tokens) == (prompt, completion)
    assert (job.prompt_tokens, job.completion_tokens) == (prompt, completion)
    assert abs(item.cost - cost) < Decimal("0.00000002") and abs(job.cost - cost) < Decimal("0.000002")


@pytest.mark.django_db(transaction=True)
def test_a_rejected_answer_stays_paid_for_when_its_item_is_then_answered_from_the_cache(
    rejected_then_handed_back, write, owner
):
    """While the job is paused after a rejected answer, another job sends the same request: on resume the
    item is answered from the cache, which costs nothing, and the rejected answer still counts."""
    job, served = rejected_then_handed_back("paused", use_cache=True)
    rejected = _paid(served)
    other = make_job(write, owner, job.endpoint, 1, text=LONG, start=False, response_format=chat_format())
    Job.objects.filter(pk=other.pk).update(use_cache=True)
    Job.start_slices(other.pk)
    assert _run_to_the_end(other).n_succeeded == 1 and len(served) == 2
    control.resume(job)
    job = _run_to_the_end(job)

    item = job.items.get()
    assert (item.status, item.from_cache, len(served)) == (Item.Status.SUCCEEDED, True, 2)
    assert (item.prompt_tokens, item.completion_tokens) == rejected[:2]
    assert (job.prompt_tokens, job.completion_tokens, job.cache_hits) == (*rejected[:2], 1)
    assert abs(item.cost - rejected[2]) < Decimal("0.00000002") and abs(job.cost - rejected[2]) < Decimal("0.000002")
