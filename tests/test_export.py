"""Round trip: an OpenAI batch file -> ingest -> results -> OpenAI output/error files and CSV."""

import csv
import io
import json

import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject

from jobs import export, ingest
from jobs.models import Item, Job
from tests.factories import chat_line

pytestmark = pytest.mark.django_db


def chat_response(text: str, prompt_tokens: int = 9) -> str:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "finish_reason": "stop",
                }
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


# The input file of OpenAI's Batch guide, byte for byte.
OPENAI_INPUT = (
    '{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-3.5-turbo-0125", '
    '"messages": [{"role": "system", "content": "You are a helpful assistant."},{"role": "user", "content": "Hello world!"}],"max_tokens": 1000}}\n'
    '{"custom_id": "request-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-3.5-turbo-0125", '
    '"messages": [{"role": "system", "content": "You are an unhelpful assistant."},{"role": "user", "content": "Hello world!"}],"max_tokens": 1000}}\n'
)

# Bodies as OpenAI sends them: pretty-printed, answers with two spaces, errors with four.
OPENAI_ANSWER = (
    json.dumps(
        {
            "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
            "object": "chat.completion",
            "created": 1741570283,
            "model": "gpt-3.5-turbo-0125",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello! How can I assist you today?",
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 19,
                "completion_tokens": 10,
                "total_tokens": 29,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": None,
        },
        indent=2,
    )
    + "\n"
)
OPENAI_ERROR = """{
    "error": {
        "message": "Sorry! We've encountered an issue with repetitive patterns in your prompt. Please try again with a different prompt.",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "invalid_prompt"
    }
}
"""


def records(text: str) -> list[dict]:
    """The records of a JSONL file, each of which must be exactly one line of JSON."""
    assert text.endswith("\n")
    return [json.loads(line) for line in text[:-1].split("\n")]


def assert_openai_output_line(record: dict) -> None:
    """The shape of a line of OpenAI's batch output and error files."""
    assert set(record) == {"id", "custom_id", "response", "error"}
    assert record["id"].startswith("batch_req_") and isinstance(record["custom_id"], str)
    if record["response"] is not None:
        assert set(record["response"]) == {"status_code", "request_id", "body"}
        assert isinstance(record["response"]["status_code"], int) and isinstance(record["response"]["body"], dict)
        assert record["error"] is None
    else:
        assert set(record["error"]) == {"code", "message"}


def test_openai_file_round_trips_to_openai_output_and_error_files(write, owner):
    job = ingest.create_job(ingest.validate(write("batchinput.jsonl", OPENAI_INPUT)), owner=owner)
    sent = [json.loads(line) for line in OPENAI_INPUT.splitlines()]
    stored = list(job.items.order_by("line").values_list("custom_id", "body"))
    assert [(c, json.loads(b)) for c, b in stored] == [(line["custom_id"], line["body"]) for line in sent]

    finish(
        job, "request-1", Item.Status.SUCCEEDED, http_status=200, request_id="req_83a7c6f5a9b2", response=OPENAI_ANSWER
    )
    error_fields = {"error_code": "invalid_prompt", "error_message": json.loads(OPENAI_ERROR)["error"]["message"]}
    finish(
        job,
        "request-2",
        Item.Status.FAILED,
        http_status=400,
        request_id="req_4b1f0e2d7c9a",
        response=OPENAI_ERROR,
        **error_fields,
    )

    [result] = records(read(export.results_jsonl(job)))
    assert_openai_output_line(result)
    assert result["custom_id"] == "request-1"
    assert (result["response"]["status_code"], result["response"]["request_id"]) == (200, "req_83a7c6f5a9b2")
    assert result["response"]["body"] == json.loads(OPENAI_ANSWER)
    completion = ChatCompletion.model_validate(result["response"]["body"])
    assert completion.choices[0].message.content == "Hello! How can I assist you today?"

    [error] = records(read(export.errors_jsonl(job)))
    assert_openai_output_line(error)
    assert error["custom_id"] == "request-2"
    assert (error["response"]["status_code"], error["response"]["request_id"]) == (400, "req_4b1f0e2d7c9a")
    assert error["response"]["body"] == json.loads(OPENAI_ERROR)
    assert ErrorObject.model_validate(error["response"]["body"]["error"]).code == "invalid_prompt"

    rows = list(csv.DictReader(io.StringIO(read(export.results_csv(job)))))
    assert [(r["custom_id"], r["output"], r["status"]) for r in rows] == [
        ("request-1", "Hello! How can I assist you today?", "succeeded"),
        ("request-2", "", "failed"),
    ]


def test_stored_bodies_of_any_layout_export_as_one_line_each(job):
    answer = json.loads(chat_response("Fine"))
    finish(job, "req-0", Item.Status.SUCCEEDED, http_status=200, response=json.dumps(answer, indent=4))
    finish(job, "req-1", Item.Status.SUCCEEDED, http_status=200, response="\r\n " + json.dumps(answer) + "\r\n")
    finish(
        job,
        "req-2",
        Item.Status.FAILED,
        http_status=429,
        response='\n  {"error": {"message": "Slow down",\n "type": "requests"}}',
    )
    finish(job, "req-3", Item.Status.FAILED, http_status=500, response="Internal\nServer Error\n")
    results = records(read(export.results_jsonl(job)))
    assert [r["response"]["body"] for r in results] == [answer, answer]
    errors = records(read(export.errors_jsonl(job)))
    assert errors[0]["response"]["body"] == {"error": {"message": "Slow down", "type": "requests"}}
    assert errors[1]["response"]["body"]["error"]["message"] == "Internal\nServer Error\n"
    for record in results + errors:
        assert_openai_output_line(record)


def test_output_file_matches_openai_schema_in_input_order(job):
    for i in (4, 0, 2):  # finish out of order
        finish(
            job,
            f"req-{i}",
            Item.Status.SUCCEEDED,
            http_status=200,
            request_id=f"req_abc{i}",
            response=chat_response(f"Answer {i} — ✓"),
        )
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
    error_body = json.dumps(
        {"error": {"message": "Invalid 'messages'", "type": "invalid_request_error", "param": "messages", "code": None}}
    )
    finish(
        job,
        "req-1",
        Item.Status.FAILED,
        http_status=400,
        response=error_body,
        request_id="req_x",
        error_message="Invalid 'messages'",
    )
    finish(job, "req-2", Item.Status.FAILED, http_status=502, response="<html>Bad gateway</html>")
    finish(
        job,
        "req-3",
        Item.Status.FAILED,
        error_code="connection_error",
        error_message="Could not connect after 5 attempts",
    )
    finish(job, "req-4", Item.Status.EXPIRED)
    finish(job, "req-5", Item.Status.CANCELLED)
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
    finish(
        job,
        "req-0",
        Item.Status.SUCCEEDED,
        http_status=200,
        response=chat_response('=HYPERLINK("http://evil")'),
        prompt_tokens=9,
        completion_tokens=3,
        latency_ms=120,
    )
    finish(job, "req-1", Item.Status.SUCCEEDED, http_status=200, response=chat_response("-42"))
    finish(job, "req-2", Item.Status.FAILED, http_status=400, error_message="Bad request")
    rows = list(csv.DictReader(io.StringIO(read(export.results_csv(job)))))
    assert list(rows[0]) == [
        "custom_id",
        "output",
        "status",
        "error",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms",
    ]
    assert len(rows) == 6
    assert rows[0]["output"] == '\'=HYPERLINK("http://evil")'  # no formula runs in a spreadsheet
    assert rows[1]["output"] == "-42"  # a plain negative number is a number in a spreadsheet, not a formula
    assert (rows[0]["prompt_tokens"], rows[0]["latency_ms"]) == ("9", "120")
    assert rows[2]["status"] == "failed" and rows[2]["error"] == "HTTP 400: Bad request"
    assert rows[5]["status"] == "pending" and rows[5]["output"] == ""


def test_csv_joins_input_rows_and_structured_fields(write, owner):
    schema = {
        "type": "object",
        "properties": {"sentiment": {"type": "string"}, "confidence": {"type": "number"}, "tags": {"type": "array"}},
    }
    template = ingest.Template(
        model="gpt-4o-mini", user_prompt="{{ review }}", json_schema=json.dumps(schema), custom_id_column="id"
    )
    text = 'id,review,output\nr1,"Lovely, fast"\nr2,Broken\nr3,Meh\n'
    plan = ingest.validate(write("reviews.csv", text), format=Job.Format.CSV, template=template)
    assert plan.ok, plan.errors
    job = ingest.create_job(plan, owner=owner)
    answer = {"sentiment": "positive", "confidence": 0.9, "tags": ["speed", "quality"]}
    finish(job, "r1", Item.Status.SUCCEEDED, http_status=200, response=chat_response(json.dumps(answer)))
    finish(job, "r2", Item.Status.SUCCEEDED, http_status=200, response=chat_response("not json at all"))
    rows = list(csv.reader(io.StringIO(read(export.results_csv(job)))))
    header = rows[0]
    assert header[:4] == ["id", "review", "output", "output_result"]  # an input column named output is kept
    assert header[4:7] == ["sentiment", "confidence", "tags"]
    assert rows[1][:2] == ["r1", "Lovely, fast"]
    assert rows[1][4:7] == ["positive", "0.9", '["speed", "quality"]']
    assert rows[2][3] == "not json at all" and rows[2][4:7] == ["", "", ""]
    assert rows[3][:3] == ["r3", "Meh", ""]  # a missing cell comes back empty


def test_embeddings_round_trip(write, owner):
    lines = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": f"item {i}"},
        }
        for i in range(2)
    ]
    job = ingest.create_job(ingest.validate(write("emb.jsonl", lines)), owner=owner)
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 2, "total_tokens": 2},
    }
    finish(job, "e0", Item.Status.SUCCEEDED, http_status=200, response=json.dumps(body))
    out = json.loads(read(export.results_jsonl(job)))
    assert CreateEmbeddingResponse.model_validate(out["response"]["body"]).data[0].embedding == [0.1, -0.2]
    rows = list(csv.DictReader(io.StringIO(read(export.results_csv(job)))))
    assert json.loads(rows[0]["embedding"]) == [0.1, -0.2]


def test_output_text_of_each_endpoint():
    assert export.output_text("/v1/completions", {"choices": [{"text": "hi"}]}) == "hi"
    responses = {
        "output": [
            {"type": "reasoning"},
            {
                "type": "message",
                "content": [{"type": "output_text", "text": "a"}, {"type": "output_text", "text": "b"}],
            },
        ]
    }
    assert export.output_text("/v1/responses", responses) == "ab"
    tool = {"choices": [{"message": {"content": None, "tool_calls": [{"id": "t"}]}}]}
    assert json.loads(export.output_text("/v1/chat/completions", tool)) == [{"id": "t"}]
    assert export.output_text("/v1/chat/completions", {"weird": True}) == ""


def test_safe_cell_quotes_formulas_but_not_plain_negative_numbers():
    assert [
        export._safe_cell(v) for v in ["-42", "-0.5", "-1e3", "-1+2", "-A1", "=1", "@x", "+1", "\tx", "- 3", "ok"]
    ] == ["-42", "-0.5", "-1e3", "'-1+2", "'-A1", "'=1", "'@x", "'+1", "'\tx", "'- 3", "ok"]


def test_safe_cell_quotes_full_width_and_space_led_formulas():
    cells = ["＝1+2", "＋1", "－A1", "＠SUM(A1)", "﹦1", '  =HYPERLINK("x")', "\u00a0+1", "\u3000@x", " -42", "  ok"]
    assert [export._safe_cell(v) for v in cells] == [
        "'＝1+2",
        "'＋1",
        "'－A1",
        "'＠SUM(A1)",
        "'﹦1",
        '\'  =HYPERLINK("x")',
        "'\u00a0+1",
        "'\u3000@x",
        " -42",  # a number, with a space before it
        "  ok",
    ]
