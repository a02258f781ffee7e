"""A hostile upstream's answers (issue 21): 200 MB answers, gzip bombs, huge error bodies and a name that
resolves elsewhere at connect time (DNS rebinding). Answers are read up to BATCHSITE_MAX_ANSWER_MB and the rest
never: the request fails as answer_too_large, not retried, and the workers' memory stays bounded. A name that
leads to a refused address when the engine connects pauses the job and gets no request."""

import gzip
import json
import os
import socket
import time
from pathlib import Path

import pytest

from jobs.models import Item, Job
from tests.factories import make_endpoint, make_job
from tests.servers import wait_until
from tests.test_hardening_upstream import ANSWER, Server, send_json
from tests.test_runner_rules import slice_run

MB = 1024 * 1024


def huge_answer(handler, size: int, declare: bool):
    """A 200 with a JSON answer of `size` bytes, streamed a megabyte at a time (with or without a length)."""
    head, tail = b'{"id":"x","object":"chat.completion","choices":[{"message":{"content":"', b'"}}]}'
    handler.send_response(200)
    handler.send_header("content-type", "application/json")
    if declare:
        handler.send_header("content-length", str(size))
    handler.end_headers()  # HTTP/1.0: without a length, the body runs until the connection closes
    try:
        handler.wfile.write(head)
        left = size - len(head) - len(tail)
        block = b"A" * MB
        while left > 0:
            handler.wfile.write(block[: min(MB, left)])
            left -= MB
        handler.wfile.write(tail)
    except OSError:  # the client stopped reading and closed: what it should do
        pass


def peak_rss_mb(group: int) -> float:
    """The largest peak resident memory (VmHWM) of the processes in a process group, in MB."""
    peak = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) != group:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, IndexError, ValueError):
            continue
    return peak / 1024


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_200_mb_answers_fail_as_too_large_and_the_workers_stay_small(cluster, write, owner):
    asked = []

    def answer(handler):
        asked.append(1)
        huge_answer(handler, 200 * MB, declare=len(asked) % 2 == 0)  # half say their size, half do not

    hostile = Server(answer)
    try:
        workers = cluster()
        job = make_job(write, owner, make_endpoint(f"{hostile.url}/v1", concurrency=2), 4)

        def done():
            job.refresh_from_db()
            return job.status == Job.Status.COMPLETED

        wait_until(done, 180, 0.3, "the job to end")
        peak = peak_rss_mb(workers.proc.pid)
    finally:
        hostile.close()
    items = list(job.items.all())
    assert {(i.status, i.error_code, i.attempts) for i in items} == {(Item.Status.FAILED, "answer_too_large", 1)}
    assert all("BATCHSITE_MAX_ANSWER_MB" in i.error_message and not i.response for i in items)
    assert len(asked) == 4  # not retried
    assert peak < 600, f"a worker peaked at {peak:.0f} MB"


def gzipped(body: bytes):
    """An answer of a 200 with `body` as it is, saying it is gzip."""

    def answer(handler):
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-encoding", "gzip")
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


@pytest.mark.django_db(transaction=True)
def test_a_gzip_bomb_is_inflated_only_up_to_the_limit(write, owner, monkeypatch, settings):
    settings.BATCHSITE_MAX_ANSWER_MB = 1
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    bomb = gzip.compress(b'{"id":"x","pad":"' + b"0" * (64 * MB) + b'"}', 9)  # ~64 KB on the wire
    hostile = Server(gzipped(bomb))
    try:
        job = make_job(write, owner, make_endpoint(f"{hostile.url}/v1", concurrency=2), 2, start=False)
        slice_run(job, budget=5.0)
    finally:
        hostile.close()
    assert {(i.status, i.error_code) for i in job.items.all()} == {(Item.Status.FAILED, "answer_too_large")}


@pytest.mark.django_db(transaction=True)
def test_a_gzipped_answer_within_the_limit_is_read(write, owner, monkeypatch):
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    hostile = Server(gzipped(gzip.compress(json.dumps(ANSWER).encode())))
    try:
        job = make_job(write, owner, make_endpoint(f"{hostile.url}/v1", concurrency=2), 2, start=False)
        slice_run(job, budget=5.0)
    finally:
        hostile.close()
    assert job.n_succeeded == 2
    assert {json.loads(i.response)["id"] for i in job.items.all()} == {"chatcmpl-internal"}


@pytest.mark.django_db(transaction=True)
def test_a_huge_error_body_is_cut_and_the_error_still_read(write, owner, monkeypatch):
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    error = {
        "error": {"message": "bad request", "type": "invalid_request_error", "code": "nope"},
        "pad": "x" * (50 * MB),
    }
    hostile = Server(lambda h: send_json(h, 400, error))
    try:
        job = make_job(write, owner, make_endpoint(f"{hostile.url}/v1", concurrency=2), 2, start=False)
        slice_run(job, budget=5.0)
    finally:
        hostile.close()
    items = list(job.items.all())
    assert {(i.status, i.http_status, i.error_code, i.error_message) for i in items} == {
        (Item.Status.FAILED, 400, "nope", "bad request")  # read from the body's first 64 KB
    }
    assert all(len(i.response) <= 64 * 1024 for i in items)


def resolving(monkeypatch, name: str, answers: list[str]):
    """`name` resolves to answers[0] the first time, answers[1] the next, ...: the last one from then on."""
    real = socket.getaddrinfo
    asked = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != name:
            return real(host, port, *args, **kwargs)
        address = answers[min(len(asked), len(answers) - 1)]
        asked.append(address)
        return real(address, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


@pytest.mark.django_db(transaction=True)
def test_a_name_that_resolves_elsewhere_at_connect_time_is_refused(write, owner, monkeypatch):
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    upstream = Server(lambda h: send_json(h, 200, ANSWER))
    asked = resolving(monkeypatch, "rebind.example", ["127.0.0.1", "169.254.169.254"])
    try:
        endpoint = make_endpoint(f"http://rebind.example:{upstream.httpd.server_port}/v1", concurrency=2)
        job = make_job(write, owner, endpoint, 3, start=False)
        slice_run(job, budget=5.0)
    finally:
        upstream.close()
    assert asked[0] == "127.0.0.1" and "169.254.169.254" in asked[1:]  # checked, then rebound for the connection
    assert job.status == Job.Status.PAUSED and "169.254.169.254" in job.status_reason
    assert job.n_failed == 0 and job.n_succeeded == 0  # nothing lost: the items wait for the endpoint to be fixed


@pytest.mark.django_db(transaction=True)
def test_a_name_that_resolves_to_an_allowed_address_is_used(write, owner, monkeypatch):
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    upstream = Server(lambda h: send_json(h, 200, ANSWER))
    resolving(monkeypatch, "models.example", ["127.0.0.1"])
    try:
        endpoint = make_endpoint(f"http://models.example:{upstream.httpd.server_port}/v1", concurrency=2)
        job = make_job(write, owner, endpoint, 3, start=False)
        slice_run(job, budget=5.0)
    finally:
        upstream.close()
    assert job.n_succeeded == 3 and upstream.hits == 3


def test_the_worker_memory_probe_reads_this_process():
    assert peak_rss_mb(os.getpgrp()) > 10  # the probe the 200 MB test relies on measures something


@pytest.mark.django_db(transaction=True)
def test_a_result_line_over_the_limit_fails_its_request_unread(write, owner, settings):
    from simulator import SimConfig, serve_in_thread
    from tests.test_remote import drive, remote_job

    settings.BATCHSITE_MAX_ANSWER_MB = 1
    with serve_in_thread(SimConfig(batch_seconds=0.5, seed=1)) as base_url:
        big = "word " * 300_000  # 1.5 MB, echoed back in the answer
        job = remote_job(write, owner, make_endpoint(base_url), 4, text=lambda i: big if i == 1 else f"Question {i}")
        job = drive(job)
    items = {i.custom_id: i for i in job.items.all()}
    assert job.status == Job.Status.COMPLETED and (job.n_succeeded, job.n_failed) == (3, 1)
    assert (items["req-1"].status, items["req-1"].error_code) == (Item.Status.FAILED, "answer_too_large")
    assert "BATCHSITE_MAX_ANSWER_MB" in items["req-1"].error_message and not items["req-1"].response


@pytest.mark.django_db(transaction=True)
def test_the_remote_engine_connects_only_to_checked_addresses(write, owner, monkeypatch):
    from jobs.engine import remote
    from simulator import SimConfig, serve_in_thread
    from tests.test_remote import remote_job

    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    with serve_in_thread(SimConfig(batch_seconds=0.5, seed=1)) as base_url:
        port = base_url.split(":")[2].split("/")[0]
        asked = resolving(monkeypatch, "rebind.example", ["127.0.0.1", "169.254.169.254"])
        job = remote_job(write, owner, make_endpoint(f"http://rebind.example:{port}/v1"), 2)
        remote.poll_round()
    job.refresh_from_db()
    assert asked[0] == "127.0.0.1" and "169.254.169.254" in asked[1:]
    assert job.status == Job.Status.PAUSED and "169.254.169.254" in job.status_reason
    assert not job.remote_batches.exclude(batch_id="").exists()  # no batch made at the refused address


@pytest.mark.django_db
@pytest.mark.parametrize(
    "page, form",
    [
        ("/endpoints/new/", {"name": "typo", "base_url": "http://no-such-host.invalid/v1", "concurrency": 10}),
        ("/team/webhooks/", {"name": "typo", "url": "http://no-such-host.invalid/hook"}),
    ],
)
def test_an_endpoint_or_webhook_whose_name_does_not_resolve_is_not_saved(client, staff, page, form):
    client.force_login(staff)
    response = client.post(page, form)
    assert response.status_code == 200 and b"does not resolve from this server" in response.content


@pytest.mark.parametrize("compressed", [False, True])
def test_the_sdks_transport_reads_no_control_answer_past_its_bound(compressed):
    """What the remote engine's SDK client and the endpoint Test read through (egress.checked_transport): a 20 MB
    batch object, or a gzip bomb of one, fails the read at 8 MB; a file's content streams through whole."""
    import httpx2

    from jobs import egress

    big = b'{"id":"batch_1","pad":"' + b"A" * (20 * MB) + b'"}'
    body = gzip.compress(big, 9) if compressed else big

    def answer(handler):
        handler.send_response(200)
        handler.send_header("content-type", "application/json")
        if compressed:
            handler.send_header("content-encoding", "gzip")
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except OSError:
            pass

    hostile = Server(answer)
    try:
        with httpx2.Client(transport=egress.checked_transport(), timeout=30) as client:
            with pytest.raises(httpx2.RemoteProtocolError, match="more than 8 MB"):
                client.get(f"{hostile.url}/v1/batches/batch_1")
            with client.stream("GET", f"{hostile.url}/v1/files/file_1/content") as response:
                assert sum(len(chunk) for chunk in response.iter_bytes()) == len(big)  # inflated, in pieces
    finally:
        hostile.close()


def test_a_call_whose_answer_drips_ends_at_its_deadline(monkeypatch):
    """httpx's timeouts are per read: a server sending a byte a second would hold the remote poller forever.
    Each call through egress.checked_transport has one deadline for all of it, headers included."""
    import httpx2

    from jobs import egress
    from tests.test_hardening_webhooks import RawReceiver, drip

    monkeypatch.setattr(egress, "CALL_DEADLINE", 1.5)
    receiver = RawReceiver(drip(b"HTTP/1.1 200 OK\r\nX-Slow: ", every=0.2))
    try:
        with httpx2.Client(transport=egress.checked_transport(), timeout=30) as client:
            started = time.monotonic()
            with pytest.raises(httpx2.ReadTimeout):
                client.get(receiver.url.replace("/hook", "/v1/batches/batch_1"))
            assert time.monotonic() - started < 1.5 + 1.0
    finally:
        receiver.close()


def test_result_lines_are_split_in_linear_time_whatever_the_chunks():
    from jobs.engine.wire import LongLine, bounded_lines

    line = b'{"custom_id":"a","x":"' + b"z" * (512 * 1024) + b'"}\n'
    started = time.thread_time()
    lines = list(bounded_lines((line[i : i + 1] for i in range(len(line))), 16 * MB))  # a byte a chunk
    assert lines == [line[:-1]] and time.thread_time() - started < 3.0
    chunks = [b'{"custom_id":"a"}\n{"custom_id":"b","pad":"', b"y" * 100, b'"}\n{"custom_id":"c"}']
    assert list(bounded_lines(chunks, 60)) == [
        b'{"custom_id":"a"}',
        LongLine(b'{"custom_id":"b","pad":"' + b"y" * 100),
        b'{"custom_id":"c"}',
    ]
    assert LongLine(b'{"id":"r","custom_id":"b\\"q","pad":"yyyy').custom_id() == 'b"q'


def test_a_schema_that_branches_over_a_deep_answer_is_not_checked_for_hours():
    from jobs.engine import schemacheck

    schema = {
        "$defs": {
            "n": {
                "anyOf": [
                    {"type": "array", "items": {"$ref": "#/$defs/n"}},
                    {"type": "array", "items": {"$ref": "#/$defs/n"}},
                    {"type": "integer"},
                ]
            }
        },
        "$ref": "#/$defs/n",
    }
    want = schemacheck.wanted(
        "/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
    )
    deep = '"x"'
    for _ in range(30):
        deep = f"[{deep}]"
    started = time.thread_time()
    why = schemacheck.problem(want, "/v1/chat/completions", {"choices": [{"message": {"content": deep}}]})
    assert "nested too deeply" in why and time.thread_time() - started < 0.5
    # every element of a huge array wrong: the first error is reported, not all two million found first
    want = schemacheck.wanted(
        "/v1/chat/completions",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": {"type": "array", "items": {"type": "integer"}}},
            }
        },
    )
    started = time.thread_time()
    why = schemacheck.problem(
        want, "/v1/chat/completions", {"choices": [{"message": {"content": json.dumps(["s"] * 500_000)}}]}
    )
    assert "breaks the schema at /0" in why and time.thread_time() - started < 1.0


def test_usage_counts_from_the_server_are_whole_numbers_in_range_or_zero():
    from jobs.engine import upstream

    def usage(**counts):
        return upstream.usage_of("/v1/chat/completions", {"usage": counts})

    assert usage(prompt_tokens=-1_000_000, completion_tokens=10**30) == (0, 0, 0)  # no negative spending
    assert usage(prompt_tokens="12", completion_tokens=True) == (0, 0, 0)
    assert usage(prompt_tokens=12.0, completion_tokens=3) == (12, 3, 0)
    assert upstream.usage_of("/v1/chat/completions", {"usage": ["not", "an", "object"]}) == (0, 0, 0)


@pytest.mark.django_db
def test_a_model_name_longer_than_its_column_is_a_line_error(write):
    from jobs import ingest
    from tests.factories import chat_line

    plan = ingest.validate(write("m.jsonl", [chat_line("a"), chat_line("b", model="m" * 201)]))
    assert not plan.ok and [(e.line, e.code) for e in plan.errors] == [(2, "invalid_value")]
    assert "at most 200" in plan.errors[0].message


@pytest.mark.django_db
def test_the_item_page_shows_the_start_of_a_huge_answer_not_all_of_it(client, owner, write):
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 1, start=False)
    item = job.items.get()
    answer = {**ANSWER, "choices": [{"index": 0, "message": {"role": "assistant", "content": "<b>" + "w" * 4 * MB}}]}
    Item.objects.filter(pk=item.pk).update(status=Item.Status.SUCCEEDED, response=json.dumps(answer))
    client.force_login(owner)
    page = client.get(f"/jobs/{job.pk}/items/{item.pk}/").content.decode()
    assert len(page) < 1 * MB and "more characters: download the results" in page
    assert "<b>w" not in page and "&lt;b&gt;w" in page  # escaped, as model output always is
