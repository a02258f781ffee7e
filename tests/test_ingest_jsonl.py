"""OpenAI batch JSONL validation: every error with its line number, and nothing saved on error."""

import json
import tracemalloc

import pytest
from django.utils import timezone

from jobs import ingest
from jobs.models import Item, Job, ledger
from tests.factories import chat_line


def codes(plan):
    return [(e.line, e.code) for e in plan.errors]


def test_accepts_openai_file_unchanged(write):
    # The example from OpenAI's Batch guide, byte for byte, plus a trailing newline.
    text = (
        '{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-3.5-turbo-0125", '
        '"messages": [{"role": "system", "content": "You are a helpful assistant."},{"role": "user", "content": "Hello world!"}],"max_tokens": 1000}}\n'
        '{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-3.5-turbo-0125", '
        '"messages": [{"role": "system", "content": "You are an unhelpful assistant."},{"role": "user", "content": "Hello world!"}],"max_tokens": 1000}}\n'
    )
    plan = ingest.validate(write("batchinput.jsonl", text))
    assert plan.ok, plan.errors
    assert plan.count == 2
    assert plan.url == "/v1/chat/completions"
    assert plan.model == "gpt-3.5-turbo-0125"
    assert plan.preview[0]["body"]["messages"][1]["content"] == "Hello world!"
    assert 10 < plan.est_input_tokens < 60
    assert plan.max_output_tokens == 2000


@pytest.mark.parametrize(
    "url,body",
    [
        ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "a red chair"}),
        ("/v1/completions", {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hi"}),
        ("/v1/responses", {"model": "gpt-4o-mini", "input": "Say hi"}),
        ("/v1/responses", {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "Say hi"}]}),
    ],
)
def test_accepts_every_supported_endpoint(write, url, body):
    plan = ingest.validate(write("f.jsonl", [{"custom_id": "a", "method": "POST", "url": url, "body": body}]))
    assert plan.ok, plan.errors
    assert plan.url == url
    assert plan.est_input_tokens > 0


def test_bom_crlf_and_blank_lines_are_tolerated(write):
    lines = [json.dumps(chat_line("a")), "", json.dumps(chat_line("b")), "   "]
    plan = ingest.validate(write("f.jsonl", "\ufeff" + "\r\n".join(lines) + "\r\n"))
    assert plan.ok, plan.errors
    assert plan.count == 2


def test_invalid_json_reports_line_and_column(write):
    plan = ingest.validate(write("f.jsonl", json.dumps(chat_line("a")) + '\n{"custom_id": "b", \n'))
    assert codes(plan) == [(2, "invalid_json_line")]
    assert "Line 2" in plan.errors[0].message and "column" in plan.errors[0].message


def test_line_that_is_not_an_object(write):
    plan = ingest.validate(write("f.jsonl", '["a", "b"]\n42\n'))
    assert codes(plan) == [(1, "invalid_json_line"), (2, "invalid_json_line")]
    assert "not an array" in plan.errors[0].message


@pytest.mark.parametrize("field", ["custom_id", "method", "url", "body"])
def test_missing_field(write, field):
    line = chat_line("a")
    del line[field]
    plan = ingest.validate(write("f.jsonl", [chat_line("x"), line]))
    assert (2, "missing_required_parameter") in codes(plan)
    assert plan.errors[0].param == field


@pytest.mark.parametrize(
    "field,value,code",
    [
        ("custom_id", 7, "invalid_type"),
        ("body", "text", "invalid_type"),
        ("url", ["/v1"], "invalid_type"),
        ("method", 1, "invalid_type"),
        ("method", None, "missing_required_parameter"),  # null counts as absent, as at OpenAI
    ],
)
def test_wrong_typed_field(write, field, value, code):
    line = chat_line("a")
    line[field] = value
    plan = ingest.validate(write("f.jsonl", [line]))
    assert codes(plan) == [(1, code)]
    assert plan.errors[0].param == field


def test_duplicate_custom_id_names_both_lines(write):
    plan = ingest.validate(write("f.jsonl", [chat_line("a"), chat_line("b"), chat_line("a")]))
    assert codes(plan) == [(3, "duplicate_custom_id")]
    assert "line 1" in plan.errors[0].message


def test_duplicates_found_among_many_ids(write):
    lines = [chat_line(f"id-{i}") for i in range(5000)]
    lines += [chat_line("id-0"), chat_line("id-2500"), chat_line("id-4999")]
    plan = ingest.validate(write("f.jsonl", lines))
    assert codes(plan) == [(5001, "duplicate_custom_id"), (5002, "duplicate_custom_id"), (5003, "duplicate_custom_id")]
    assert [e.message.rsplit(" ", 1)[-1] for e in plan.errors] == ["1.", "2501.", "5000."]  # "... on line 1."


def test_duplicate_detection_memory_does_not_grow_with_the_ids(write):
    # Files of up to 1M lines are allowed: keeping every custom_id would cost 120+ MB there, and
    # ids may be 1 KB long. Only a fixed-size digest of each id is kept.
    n = 20_000
    line = json.dumps(chat_line("X", "hi"))
    path = write("long-ids.jsonl", "".join(line.replace('"X"', f'"{i:01000d}"') + "\n" for i in range(n)))
    ingest.validate(write("warm-up.jsonl", [chat_line("a")]))  # tiktoken's tables load once
    tracemalloc.start()
    try:
        plan = ingest.validate(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert plan.ok and plan.count == n
    assert peak < 250 * n, f"{peak / n:.0f} bytes a line"  # each id alone is 1,000


def test_unsupported_url(write):
    line = chat_line("a")
    line["url"] = "/v1/images/generations"
    plan = ingest.validate(write("f.jsonl", [line]))
    assert codes(plan) == [(1, "invalid_url")]


def test_mixed_urls(write):
    other = {"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}
    plan = ingest.validate(write("f.jsonl", [chat_line("a"), other]))
    assert codes(plan) == [(2, "mismatched_url")]
    assert "line 1" in plan.errors[0].message


def test_url_must_match_the_batch_endpoint(write):
    plan = ingest.validate(write("f.jsonl", [chat_line("a")]), expected_url="/v1/embeddings")
    assert codes(plan) == [(1, "mismatched_url")]


def test_method_must_be_post(write):
    line = chat_line("a")
    line["method"] = "GET"
    assert codes(ingest.validate(write("f.jsonl", [line]))) == [(1, "invalid_method")]


def test_missing_model(write):
    line = chat_line("a")
    del line["body"]["model"]
    assert codes(ingest.validate(write("f.jsonl", [line]))) == [(1, "missing_model")]


def test_missing_messages_and_empty_messages(write):
    a, b = chat_line("a"), chat_line("b")
    del a["body"]["messages"]
    b["body"]["messages"] = []
    plan = ingest.validate(write("f.jsonl", [a, b]))
    assert codes(plan) == [(1, "missing_required_parameter"), (2, "invalid_type")]


def test_streaming_is_refused(write):
    assert codes(ingest.validate(write("f.jsonl", [chat_line("a", stream=True)]))) == [(1, "invalid_value")]


def test_mixed_models_only_refused_for_remote_batches(write):
    path = write("f.jsonl", [chat_line("a", model="gpt-4o"), chat_line("b", model="gpt-4o-mini")])
    assert ingest.validate(path).ok
    assert codes(ingest.validate(path, single_model=True)) == [(None, "mismatched_model")]


def test_empty_file(write):
    assert codes(ingest.validate(write("f.jsonl", ""))) == [(None, "empty_file")]
    assert codes(ingest.validate(write("g.jsonl", "\n\n  \n"))) == [(None, "empty_file")]


def test_not_utf8(write):
    good = json.dumps(chat_line("a")).encode()
    bad = json.dumps(chat_line("b", "café"), ensure_ascii=False).encode().replace("é".encode(), b"\xe9")
    plan = ingest.validate(write("f.jsonl", good + b"\n" + bad + b"\n"))
    assert codes(plan) == [(2, "invalid_encoding")]
    assert "UTF-8" in plan.errors[0].message


def test_lone_surrogate_escape_is_a_line_error_not_a_crash(write, owner):
    good = json.dumps(chat_line("emoji", "Ship it \U0001f680"))  # a valid pair, spelled \ud83d\ude80
    bad = json.dumps(chat_line("half", "broken \ud800 text"))
    assert "\\ud800" in bad and "\\ud83d" in good
    plan = ingest.validate(write("s.jsonl", good + "\n" + bad + "\n"))
    assert [(e.line, e.code) for e in plan.errors] == [(2, "invalid_json_line")] and "surrogate" in plan.errors[
        0
    ].message
    plan = ingest.validate(write("ok.jsonl", good + "\n"))
    job = ingest.create_job(plan, owner=owner)
    assert "\U0001f680" in job.items.get().body or "\\ud83d" in job.items.get().body
    with pytest.raises(ValueError, match="surrogate"):
        ingest.schema_format('{"type": "string", "description": "\\udfff"}')


def test_line_too_long_and_too_many_lines(write):
    limits = ingest.Limits(max_lines=2, max_line_bytes=200, max_file_bytes=10**6)
    path = write("f.jsonl", [chat_line("a"), chat_line("b", "x" * 300), chat_line("c")])
    assert codes(ingest.validate(path, limits=limits)) == [(2, "line_too_long"), (3, "too_many_lines")]


def test_file_too_large(write):
    limits = ingest.Limits(max_lines=10, max_line_bytes=10**6, max_file_bytes=100)
    plan = ingest.validate(write("f.jsonl", [chat_line("a"), chat_line("b")]), limits=limits)
    assert codes(plan) == [(None, "file_too_large")]


def test_all_errors_reported_up_to_the_cap(write):
    text = "".join("not json\n" for _ in range(250))
    plan = ingest.validate(write("f.jsonl", text))
    assert plan.error_count == 250
    assert len(plan.errors) == ingest.MAX_ERRORS
    assert [e.line for e in plan.errors[:3]] == [1, 2, 3]


@pytest.mark.django_db
def test_file_with_errors_creates_nothing(write, owner):
    plan = ingest.validate(write("f.jsonl", [chat_line("a"), chat_line("a")]))
    with pytest.raises(ValueError):
        ingest.create_job(plan, owner=owner)
    assert Job.objects.count() == 0 and Item.objects.count() == 0


@pytest.mark.django_db
def test_create_job_stores_items_in_order(write, owner):
    lines = [chat_line(f"id-{i}", f"question {i} ✓") for i in range(12)]
    plan = ingest.validate(write("questions.jsonl", lines))
    job = ingest.create_job(plan, owner=owner)
    job.refresh_from_db()
    assert job.name == "questions"
    assert (job.total, job.n_pending, job.status) == (12, 12, Job.Status.QUEUED)
    assert job.url == "/v1/chat/completions" and job.model == "gpt-4o-mini"
    items = list(job.items.order_by("line"))
    assert [i.custom_id for i in items] == [f"id-{i}" for i in range(12)]
    assert [i.line for i in items] == list(range(1, 13))
    assert json.loads(items[3].body) == lines[3]["body"]
    assert items[0].status == Item.Status.PENDING and items[0].attempts == 0 and items[0].lease_token is None
    assert all(i.est_tokens > 0 for i in items)
    assert sum(i.est_tokens for i in items) == job.est_input_tokens
    ledger.recount(job)
    assert job.n_pending == 12 and job.total == 12


@pytest.mark.django_db
def test_create_job_is_atomic(write, owner, monkeypatch):
    plan = ingest.validate(write("f.jsonl", [chat_line(f"id-{i}") for i in range(30)]))
    monkeypatch.setattr(ingest.create, "CHUNK", 10)
    real = ingest.Plan.requests

    def failing(self):
        for n, request in enumerate(real(self)):
            if n == 25:
                raise OSError("disk went away")
            yield request

    monkeypatch.setattr(ingest.Plan, "requests", failing)
    with pytest.raises(OSError):
        ingest.create_job(plan, owner=owner)
    assert Job.objects.count() == 0 and Item.objects.count() == 0


@pytest.mark.slow  # a scale test: ~20 s, left out of make test-fast
@pytest.mark.django_db
def test_live_mode_takes_half_a_million_lines(write, owner):
    # OpenAI caps a batch file at 50,000 lines; live mode must take 500,000 and more.
    n = 500_000
    head, tail = json.dumps(chat_line("X", "hi"), separators=(",", ":")).split('"X"')
    path = write("big.jsonl", "".join(f'{head}"r{i}"{tail}\n' for i in range(n)))
    plan = ingest.validate(path)
    assert plan.ok, plan.errors
    assert plan.count == n
    job = ingest.create_job(plan, owner=owner)
    assert (job.total, job.n_pending) == (n, n)
    assert job.items.count() == n
    last = job.items.order_by("-line").values_list("line", "custom_id", "body").first()
    assert last[:2] == (n, f"r{n - 1}") and json.loads(last[2]) == chat_line("X", "hi")["body"]


def test_store_upload_enforces_size(settings):
    limits = ingest.Limits(max_lines=10, max_line_bytes=100, max_file_bytes=10)
    path, error = ingest.store_upload([b"12345", b"67890", b"x"], "../../etc/passwd", limits)
    assert path is None and error.code == "file_too_large"
    path, error = ingest.store_upload([b"12345"], "../../etc/passwd", limits)
    assert error is None and path.name == "passwd" and path.read_bytes() == b"12345"
    assert settings.DATA_DIR in path.parents


def test_stale_uploads_are_removed_unless_a_job_or_file_uses_them(write, owner, settings, tmp_path):
    settings.DATA_DIR = tmp_path / "data"  # aged folders must not outlive this test's database rows
    import os
    import time

    from jobs.models import File

    def stored(name, age_hours):
        path, error = ingest.store_upload([json.dumps(chat_line("a")).encode() + b"\n"], name)
        assert error is None
        old = time.time() - age_hours * 3600
        os.utime(path.parent, (old, old))
        return path

    abandoned = stored("abandoned.jsonl", 30)
    fresh = stored("fresh.jsonl", 1)
    launched = stored("launched.jsonl", 30)
    ingest.create_job(ingest.validate(launched), owner=owner)
    api_file = stored("api.jsonl", 30)
    File.objects.create(
        owner=owner, filename="api.jsonl", purpose=File.BATCH, path=str(api_file.relative_to(api_file.parents[2]))
    )
    deleted = stored("deleted.jsonl", 30)
    File.objects.create(
        owner=owner,
        filename="d.jsonl",
        purpose=File.BATCH,
        path=str(deleted.relative_to(deleted.parents[2])),
        deleted_at=timezone.now(),
    )

    assert ingest.remove_stale_uploads() == 2
    assert not abandoned.exists() and not deleted.exists()
    assert fresh.exists() and launched.exists() and api_file.exists()
    assert ingest.remove_stale_uploads() == 0
