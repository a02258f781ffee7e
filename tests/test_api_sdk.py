"""The official openai SDK, sync and async, against a live Batchsite: web server + qcluster + simulator."""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from jobs.engine.tasks import validate_batch
from jobs.models import ApiToken, Job
from tests.factories import chat_line, jsonl, make_endpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

DONE = ("completed", "failed", "expired", "cancelled")


def question(i: int) -> str:
    return f"Question {i} SIMULATE_400" if i % 15 == 7 else f"Question {i}"


def by_custom_id(text: str) -> dict[str, dict]:
    records = {}
    for line in text.splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in records, f"{record['custom_id']} appears twice"
        records[record["custom_id"]] = record
    return records


def check_answers(output: dict[str, dict]) -> None:
    for custom_id, record in output.items():
        assert record["error"] is None and record["response"]["status_code"] == 200
        assert record["response"]["body"]["choices"][0]["message"]["content"] == f"Echo: {question(int(custom_id[4:]))}"


def token_for(user) -> str:
    return ApiToken.create_for(user, "sdk test")[1]


def test_sync_client_runs_a_batch_to_completion(cluster, simulator, web_server, write, owner):
    sim = simulator("--latency-ms", "20")
    make_endpoint(sim.base_url)
    cluster()
    web = web_server()
    n = 60
    path = write("batchinput.jsonl", [chat_line(f"req-{i}", question(i)) for i in range(n)])

    # The README's script, as a user would run it.
    client = openai.OpenAI(base_url=web.base_url, api_key=token_for(owner))
    file = client.files.create(file=open(path, "rb"), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"description": "sdk round trip"},
    )
    assert batch.status == "validating"  # the cluster validates the file after the answer
    seen = {batch.status}
    deadline = time.monotonic() + 60
    while (batch := client.batches.retrieve(batch.id)).status not in DONE:
        seen.add(batch.status)
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)

    assert batch.status == "completed" and seen <= {"validating", "in_progress"}
    failed = {f"req-{i}" for i in range(n) if "SIMULATE_400" in question(i)}
    assert batch.request_counts.model_dump() == {"total": n, "completed": n - len(failed), "failed": len(failed)}
    assert batch.created_at <= batch.in_progress_at <= batch.completed_at and batch.errors is None
    assert (
        batch.usage.input_tokens > 0
        and batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    )
    assert batch.metadata == {"description": "sdk round trip"} and batch.model == "gpt-4o-mini"
    assert batch.batchsite["status"] == "completed"  # our extra field, kept by the SDK

    output = by_custom_id(client.files.content(batch.output_file_id).text)
    errors = by_custom_id(client.files.content(batch.error_file_id).text)
    assert set(output) | set(errors) == {f"req-{i}" for i in range(n)} and not set(output) & set(errors)
    assert set(errors) == failed
    check_answers(output)
    for record in errors.values():
        assert (
            record["response"]["status_code"] == 400
            and "SIMULATE_400" in record["response"]["body"]["error"]["message"]
        )
    meta = client.files.retrieve(batch.output_file_id)
    assert meta.purpose == "batch_output" and meta.bytes == len(client.files.content(batch.output_file_id).content)
    assert client.files.content(file.id).content == path.read_bytes()
    job = Job.objects.get(pk=batch.batchsite["job_id"])
    assert (job.owner, job.name, job.n_succeeded) == (owner, "sdk round trip", n - len(failed))


def test_async_client_completes_one_batch_and_cancels_another_mid_run(cluster, simulator, web_server, owner):
    sim = simulator("--latency-ms", "200")
    make_endpoint(sim.base_url, concurrency=5)
    cluster()
    web = web_server()
    token = token_for(owner)
    small, big = 20, 300

    async def scenario():
        client = openai.AsyncOpenAI(base_url=web.base_url, api_key=token)

        async def submit(lines):
            file = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            return await client.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )

        async def wait(batch, until):
            deadline = time.monotonic() + 60
            while not until(batch := await client.batches.retrieve(batch.id)):
                assert time.monotonic() < deadline, batch
                await asyncio.sleep(0.3)
            return batch

        first = await submit([chat_line(f"req-{i}", question(i)) for i in range(small)])
        first = await wait(first, lambda b: b.status in DONE)
        first_output = (await client.files.content(first.output_file_id)).text
        first_errors = (await client.files.content(first.error_file_id)).text

        second = await submit([chat_line(f"req-{i}", question(i)) for i in range(big)])
        await wait(second, lambda b: b.request_counts.completed >= 20)
        cancelling = await client.batches.cancel(second.id)
        second = await wait(second, lambda b: b.status in DONE)
        outputs = [(await client.files.content(second.output_file_id)).text]
        outputs.append((await client.files.content(second.error_file_id)).text)
        await client.close()
        return first, (first_output, first_errors), cancelling, second, outputs

    # A thread of its own: asyncio.run() refuses to start where a loop already runs (Playwright's
    # session-wide one, when the browser tests ran first).
    with ThreadPoolExecutor(1) as thread:
        first, (first_output, first_errors), cancelling, second, (output_text, error_text) = thread.submit(
            asyncio.run, scenario()
        ).result()

    assert first.status == "completed" and first.request_counts.total == small
    output, errors = by_custom_id(first_output), by_custom_id(first_errors)
    assert set(output) | set(errors) == {f"req-{i}" for i in range(small)} and not set(output) & set(errors)
    assert set(errors) == {f"req-{i}" for i in range(small) if "SIMULATE_400" in question(i)}
    check_answers(output)

    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    assert second.status == "cancelled" and second.cancelled_at >= second.cancelling_at
    output, errors = by_custom_id(output_text), by_custom_id(error_text)
    assert 20 <= len(output) < big and second.request_counts.completed == len(output)
    check_answers(output)
    assert set(output) | set(errors) == {f"req-{i}" for i in range(big)} and not set(output) & set(errors)
    codes = {record["error"]["code"] for record in errors.values() if record["response"] is None}
    assert codes == {"batch_cancelled"}
    sent = sim.stats()["total"] - small
    time.sleep(1)
    assert sim.stats()["total"] - small == sent, "requests kept going after the batch was cancelled"
    assert sent == len(output) + sum(1 for r in errors.values() if r["response"] is not None)


def test_sdk_sees_failed_validation_lists_pages_and_token_errors(web_server, owner, teammate, write, settings):
    make_endpoint("http://127.0.0.1:9/v1")  # never called: no cluster runs here, the test validates
    web = web_server(BATCHSITE_INLINE_VALIDATION_BYTES="-1")  # a worker validates, whatever the size
    token = token_for(owner)
    client = openai.OpenAI(base_url=web.base_url, api_key=token, max_retries=0)

    bad = client.files.create(
        file=("bad.jsonl", jsonl([chat_line("a")]) + b"not json\n" + jsonl([chat_line("a")])), purpose="batch"
    )
    failed = client.batches.create(input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert failed.status == "validating"
    validate_batch(failed.batchsite["job_id"])  # what a worker does
    failed = client.batches.retrieve(failed.id)
    assert failed.status == "failed" and failed.failed_at
    assert [(e.line, e.code) for e in failed.errors.data] == [(2, "invalid_json_line"), (3, "duplicate_custom_id")]
    assert all(e.message for e in failed.errors.data)

    good = client.files.create(file=("good.jsonl", jsonl([chat_line("a")])), purpose="batch")
    made = [failed.id] + [
        client.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(4)
    ]
    first_page = client.batches.list(limit=2)
    assert [b.id for b in first_page.data] == made[::-1][:2] and first_page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]  # auto-pagination follows `after`
    assert [f.id for f in client.files.list()] == [good.id, bad.id]

    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="48h")
    assert e.value.param == "completion_window"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(failed.id)

    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=web.base_url, api_key="bs-not-a-token", max_retries=0).batches.list()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):  # a teammate's token does not reach my batch
        openai.OpenAI(base_url=web.base_url, api_key=token_for(teammate), max_retries=0).batches.retrieve(failed.id)
    ApiToken.objects.get(user=owner).revoke()
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client.batches.list()
