"""Round trip: an OpenAI batch file -> ingest -> results -> OpenAI output/error files and CSV."""

import csv
import io
import json

import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from jobs import export, ingest
from jobs.models import Item, Job
from tests.conftest import chat_line

pytestmark = pytest.mark.django_db


def chat_response(text: str, prompt_tokens: int = 9) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3},
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def finish(job, custom_id, status, **fields):
    n = Item.objects.filter(job=job, custom_id=custom_id).update(status=status, **fields)
    assert n == 1


def read(chunks) -> str:
    return "".join(chunks)


@pytest.fixture
def job(write, owner):
    lines = [chat_line(f"req-{i}", f"Question {i}: «why?»") for i in range(6)]
    return ingest.create_job(ingest.validate(write("batchinput.jsonl", lines)), owner=owner)


def test_output_file_matches_openai_schema_in_input_order(job):
    for i in (4, 0, 2):  # finish out of order
        finish(job, f"req-{i}", Item.SUCCEEDED, http_status=200, request_id=f"req_abc{i}", response=chat_response(f"Answer {i} — ✓"))
    lines = read(export.results_jsonl(job)).splitlines()
    assert len(lines) == 3
    outputs = [json.loads(line) for line in lines]
    assert [o["custom_id"] for o in outputs] == ["req-0", "req-2", "req-4"]
    for i, o in zip((0, 2, 4), outputs):
        assert set(o) == {"id", "custom_id", "response", "error"}
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert set(o["response"]) == {"status_code", "request_id", "body"}
        assert o["response"]["status_code"] == 200 and o["response"]["request_id"] == f"req_abc{i}"
        completion = ChatCompletion.model_validate(o["response"]["body"])
        assert completion.choices[0].message.content == f"Answer {i} — ✓"
    assert len({o["id"] for o in outputs}) == 3


def test_error_file_holds_http_errors_and_requests_that_never_ran(job):
    error_body = json.dumps({"error": {"message": "Invalid 'messages'", "type": "invalid_request_error", "param": "messages", "code": None}})
    finish(job, "req-1", Item.FAILED, http_status=400, response=error_body, request_id="req_x", error_message="Invalid 'messages'")
    finish(job, "req-2", Item.FAILED, http_status=502, response="<html>Bad gateway</html>")
    finish(job, "req-3", Item.FAILED, error_code="connection_error", error_message="Could not connect after 5 attempts")
    finish(job, "req-4", Item.EXPIRED)
    finish(job, "req-5", Item.CANCELLED)
    errors = [json.loads(line) for line in read(export.errors_jsonl(job)).splitlines()]
    assert [e["custom_id"] for e in errors] == ["req-1", "req-2", "req-3", "req-4", "req-5"]
    assert errors[0]["response"] == {"status_code": 400, "request_id": "req_x", "body": json.loads(error_body)}
    assert errors[0]["error"] is None
    assert errors[1]["response"]["status_code"] == 502
    assert errors[1]["response"]["body"]["error"]["message"] == "<html>Bad gateway</html>"
    assert errors[2]["response"] is None
    assert errors[2]["error"] == {"code": "connection_error", "message": "Could not connect after 5 attempts"}
    assert errors[3]["error"]["code"] == "batch_expired"
    assert errors[4]["error"]["code"] == "batch_cancelled"
    assert read(export.results_jsonl(job)) == ""


def test_csv_for_jsonl_job(job):
    finish(job, "req-0", Item.SUCCEEDED, http_status=200, response=chat_response("=HYPERLINK(\"http://evil\")"), prompt_tokens=9, completion_tokens=3, latency_ms=120)
    finish(job, "req-1", Item.SUCCEEDED, http_status=200, response=chat_response("-42"))
    finish(job, "req-2", Item.FAILED, http_status=400, error_message="Bad request")
    rows = list(csv.DictReader(io.StringIO(read(export.results_csv(job)))))
    assert list(rows[0]) == ["custom_id", "output", "status", "error", "prompt_tokens", "completion_tokens", "latency_ms"]
    assert len(rows) == 6
    assert rows[0]["output"] == "'=HYPERLINK(\"http://evil\")"  # no formula runs in a spreadsheet
    assert rows[1]["output"] == "-42"  # numbers stay numbers
    assert (rows[0]["prompt_tokens"], rows[0]["latency_ms"]) == ("9", "120")
    assert rows[2]["status"] == "failed" and rows[2]["error"] == "HTTP 400: Bad request"
    assert rows[5]["status"] == "pending" and rows[5]["output"] == ""


def test_csv_joins_input_rows_and_structured_fields(write, owner):
    schema = {
        "type": "object",
        "properties": {"sentiment": {"type": "string"}, "confidence": {"type": "number"}, "tags": {"type": "array"}},
    }
    template = ingest.Template(model="gpt-4o-mini", user_prompt="{{ review }}", json_schema=json.dumps(schema), custom_id_column="id")
    text = 'id,review,output\nr1,"Lovely, fast"\nr2,Broken\nr3,Meh\n'
    plan = ingest.validate(write("reviews.csv", text), format=Job.CSV, template=template)
    assert plan.ok, plan.errors
    job = ingest.create_job(plan, owner=owner)
    answer = {"sentiment": "positive", "confidence": 0.9, "tags": ["speed", "quality"]}
    finish(job, "r1", Item.SUCCEEDED, http_status=200, response=chat_response(json.dumps(answer)))
    finish(job, "r2", Item.SUCCEEDED, http_status=200, response=chat_response("not json at all"))
    rows = list(csv.reader(io.StringIO(read(export.results_csv(job)))))
    header = rows[0]
    assert header[:4] == ["id", "review", "output", "output_result"]  # an input column named output is kept
    assert header[4:7] == ["sentiment", "confidence", "tags"]
    assert rows[1][:2] == ["r1", "Lovely, fast"]
    assert rows[1][4:7] == ["positive", "0.9", '["speed", "quality"]']
    assert rows[2][3] == "not json at all" and rows[2][4:7] == ["", "", ""]
    assert rows[3][:3] == ["r3", "Meh", ""]  # a missing cell comes back empty


def test_embeddings_round_trip(write, owner):
    lines = [{"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "text-embedding-3-small", "input": f"item {i}"}} for i in range(2)]
    job = ingest.create_job(ingest.validate(write("emb.jsonl", lines)), owner=owner)
    body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}], "model": "text-embedding-3-small", "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    finish(job, "e0", Item.SUCCEEDED, http_status=200, response=json.dumps(body))
    out = json.loads(read(export.results_jsonl(job)))
    assert CreateEmbeddingResponse.model_validate(out["response"]["body"]).data[0].embedding == [0.1, -0.2]
    rows = list(csv.DictReader(io.StringIO(read(export.results_csv(job)))))
    assert json.loads(rows[0]["embedding"]) == [0.1, -0.2]


def test_output_text_of_each_endpoint():
    assert export.output_text("/v1/completions", {"choices": [{"text": "hi"}]}) == "hi"
    responses = {"output": [{"type": "reasoning"}, {"type": "message", "content": [{"type": "output_text", "text": "a"}, {"type": "output_text", "text": "b"}]}]}
    assert export.output_text("/v1/responses", responses) == "ab"
    tool = {"choices": [{"message": {"content": None, "tool_calls": [{"id": "t"}]}}]}
    assert json.loads(export.output_text("/v1/chat/completions", tool)) == [{"id": "t"}]
    assert export.output_text("/v1/chat/completions", {"weird": True}) == ""
