"""The simulator's Batch API controls (rejection, enqueued token limit, slow cancel, refused lines) and its
list routes, driven over real HTTP by the real openai SDK."""

import contextlib
import json
import time

import pytest

from simulator import SimConfig, serve_in_thread
from tests.test_simulator import MODEL, TERMINAL, admin, chat_line, client, jsonl, run_batch


@pytest.fixture
def start():
    """start(**SimConfig fields) -> base URL of a fresh simulator, stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **config: stack.enter_context(serve_in_thread(SimConfig(**config)))


def submit(c, lines, **create):
    """Upload JSONL lines and create a chat batch without waiting for it."""
    upload = c.files.create(file=("input.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    return c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", **create)


def wait(c, batch_id, until=TERMINAL):
    deadline = time.monotonic() + 10
    while (batch := c.batches.retrieve(batch_id)).status not in until:
        assert time.monotonic() < deadline, batch
        time.sleep(0.02)
    return batch


def budget_line(custom_id, model=MODEL):
    """A line the simulator counts as 101 tokens: 1 for the prompt, 100 for max_tokens."""
    body = {"model": model, "messages": [{"role": "user", "content": "q"}], "max_tokens": 100}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_rejected_batch_fails_with_line_errors(start):
    url = start(batch_seconds=0.3, batch_reject=True)
    c = client(url)
    batch = run_batch(c, [chat_line(f"i{i}", f"q{i}") for i in range(5)])  # created as `validating`, no raise

    assert batch.status == "failed" and batch.failed_at
    assert [(e.code, e.line) for e in batch.errors.data] == [("invalid_request", 1), ("invalid_request", 5)]
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.request_counts.total == 0

    admin(url, "/_sim/config", {"batch_reject": False})
    assert run_batch(c, [chat_line("a", "b")]).status == "completed"


def test_token_limit_fails_a_concurrent_batch_of_the_same_model_only(start):
    url = start(batch_seconds=1, batch_token_limit=1500)
    c = client(url)
    first = submit(c, [budget_line(f"a{i}") for i in range(10)])  # 1,010 tokens
    wait(c, first.id, until=("in_progress",))
    same_model = submit(c, [budget_line(f"b{i}") for i in range(10)])
    other_model = submit(c, [budget_line(f"c{i}", model="gpt-4o") for i in range(10)])

    refused = wait(c, same_model.id)
    assert refused.status == "failed" and refused.request_counts.total == 0
    [error] = refused.errors.data
    assert error.code == "token_limit_exceeded" and error.line is None
    assert error.message.startswith(f"Enqueued token limit reached for {MODEL} in organization org-sim.")
    assert "Limit: 1,500 enqueued tokens." in error.message
    assert wait(c, other_model.id).status == "completed"
    assert wait(c, first.id).status == "completed"

    assert wait(c, submit(c, [budget_line(f"d{i}") for i in range(10)]).id).status == "completed"  # room again
    assert admin(url, "/_sim/stats")["batch_peak_enqueued_tokens"] == {MODEL: 1010, "gpt-4o": 1010}


def test_cancelled_batch_stays_cancelling_then_keeps_only_answered_lines(start):
    c = client(start(batch_seconds=2, batch_cancel_seconds=0.5, batch_fail_rate=0.2))
    batch = submit(c, [chat_line(f"i{i}", f"q{i}") for i in range(100)])
    while (batch := c.batches.retrieve(batch.id)).request_counts.completed == 0:
        time.sleep(0.02)
    asked = time.monotonic()
    cancelling = c.batches.cancel(batch.id)
    answered = cancelling.request_counts.completed + cancelling.request_counts.failed

    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    seen = []
    while (batch := c.batches.retrieve(batch.id)).status == "cancelling":
        seen.append(batch)
        time.sleep(0.02)
    assert time.monotonic() - asked >= 0.5 and seen
    assert all(b.output_file_id is None for b in seen)
    assert batch.status == "cancelled" and batch.cancelled_at
    # No line is answered after the cancel: both files hold exactly the lines answered before it.
    counts = batch.request_counts
    assert (counts.total, counts.completed + counts.failed) == (100, answered) and answered < 100
    outputs, errors = jsonl(c, batch.output_file_id), jsonl(c, batch.error_file_id)
    assert (len(outputs), len(errors)) == (counts.completed, counts.failed)


def test_refused_lines_come_back_as_400_responses_with_error_null(start):
    c = client(start(batch_seconds=0.3, batch_client_error_rate=0.5, seed=1))
    batch = run_batch(c, [chat_line(f"i{i}", f"q{i}") for i in range(40)])
    outputs, refused = jsonl(c, batch.output_file_id), jsonl(c, batch.error_file_id)

    assert batch.status == "completed"
    assert 8 <= len(refused) == batch.request_counts.failed <= 32
    assert len(outputs) == batch.request_counts.completed == 40 - len(refused)
    for line in refused:
        assert line["error"] is None and line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert {o["response"]["status_code"] for o in outputs} == {200}


def test_request_counts_rise_while_in_progress(start):
    c = client(start(batch_seconds=1))
    completed = []
    run_batch(
        c,
        [chat_line(f"i{i}", f"q{i}") for i in range(80)],
        poll=lambda b: b.status == "in_progress" and completed.append(b.request_counts.completed),
    )
    assert completed == sorted(completed)
    assert any(0 < n < 80 for n in completed)


def test_batches_list_pages_newest_first_with_metadata(start):
    url = start(batch_seconds=0.3)
    c = client(url)
    ids = [submit(c, [chat_line("a", "b")], metadata={"job": str(n)}).id for n in range(5)]

    listed = list(c.batches.list(limit=2))  # the SDK follows `after` page by page
    assert [b.id for b in listed] == ids[::-1]
    assert [b.metadata for b in listed] == [{"job": str(n)} for n in reversed(range(5))]
    assert admin(url, "/_sim/stats")["by_path"]["/v1/batches"] == 5 + 3  # five creates, three pages
    page = c.batches.list(limit=2, after=ids[3])
    assert [b.id for b in page.data] == [ids[2], ids[1]] and page.has_more


def test_files_list_filters_by_purpose_with_filenames(start):
    c = client(start())
    batch_input = c.files.create(file=("requests.jsonl", b"{}\n"), purpose="batch")
    c.files.create(file=("train.jsonl", b"{}\n"), purpose="fine-tune")

    assert [(f.id, f.filename) for f in c.files.list(purpose="batch")] == [(batch_input.id, "requests.jsonl")]
    assert len(c.files.list().data) == 2


def test_a_batch_told_to_complete_ends_at_once_with_every_answer(start):
    url = start(batch_seconds=3600)  # an hour: only the control ends it within the test
    c = client(url)
    batch = submit(c, [chat_line(f"i{i}", f"q{i}") for i in range(20)])
    assert c.batches.retrieve(batch.id).status == "validating"  # for the next six minutes

    assert admin(url, "/_sim/batches/finish", {"ids": [batch.id]}) == {"finishing": [batch.id], "outcome": "complete"}

    done = wait(c, batch.id)
    assert done.status == "completed" and done.completed_at
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (20, 20, 0)
    output = [json.loads(line) for line in c.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in output) == sorted(f"i{i}" for i in range(20))


def test_batches_told_to_expire_keep_what_was_answered_and_expire_the_rest(start):
    url = start(batch_seconds=3600)
    c = client(url)
    running = [submit(c, [chat_line(f"{n}{i}", "q") for i in range(10)]) for n in "ab"]

    admin(url, "/_sim/batches/finish", {"outcome": "expire"})  # no ids: every running batch

    for batch in running:
        done = wait(c, batch.id)
        assert done.status == "expired" and done.expired_at and done.output_file_id is None  # none answered yet
        counts = done.request_counts
        assert (counts.total, counts.completed, counts.failed) == (10, 0, 10)
        errors = [json.loads(line) for line in c.files.content(done.error_file_id).text.splitlines()]
        assert {e["error"]["code"] for e in errors} == {"batch_expired"} and len(errors) == 10


def test_a_cancelled_batch_told_to_finish_is_cancelled_at_once(start):
    url = start(batch_seconds=3600, batch_cancel_seconds=3600)
    c = client(url)
    batch = submit(c, [chat_line("a", "q")])
    assert c.batches.cancel(batch.id).status == "cancelling"
    admin(url, "/_sim/batches/finish", {})

    assert wait(c, batch.id).status == "cancelled"


def test_finishing_an_unknown_batch_or_outcome_is_refused(start):
    url = start()
    with pytest.raises(Exception, match="404"):
        admin(url, "/_sim/batches/finish", {"ids": ["batch_nope"]})
    for bad in ({"outcome": "explode"}, {"ids": "batch_a"}, {"ids": [1]}, ["complete"]):
        with pytest.raises(Exception, match="400"):
            admin(url, "/_sim/batches/finish", bad)
