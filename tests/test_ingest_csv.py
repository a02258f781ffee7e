"""CSV + prompt template: quoting, unicode, delimiters, missing cells and template errors."""

import csv
import json

import pytest

from jobs import ingest
from jobs.models import Job

Template = ingest.Template


@pytest.fixture(autouse=True)
def restore_csv_field_limit():
    """Ingest sets csv's process-wide cell limit from its Limits; tests with tiny ones put it back."""
    limit = csv.field_size_limit()
    yield
    csv.field_size_limit(limit)


def plan_for(write, text, name="rows.csv", **template):
    template = Template(**{"model": "gpt-4o-mini", "user_prompt": "Review: {{ review }}", **template})
    return ingest.validate(write(name, text), format=Job.Format.CSV, template=template)


def user_messages(plan):
    return [line["body"]["messages"][-1]["content"] for line in plan.preview]


def test_quotes_commas_newlines_and_unicode(write):
    text = 'id,review\n1,"Great, really ""great"" — 5★"\n2,"Line one\nline two"\n3,Ça marche 😀\n'
    plan = plan_for(write, text, custom_id_column="id")
    assert plan.ok, plan.errors
    assert user_messages(plan) == [
        'Review: Great, really "great" — 5★',
        "Review: Line one\nline two",
        "Review: Ça marche 😀",
    ]
    assert [line["custom_id"] for line in plan.preview] == ["1", "2", "3"]
    assert plan.columns == ["id", "review"]


@pytest.mark.parametrize("delimiter", [";", "\t", ","])
def test_delimiter_is_detected(write, delimiter):
    text = f"review{delimiter}stars\nnice, quick{delimiter}5\n".replace("nice, quick", '"nice, quick"')
    plan = plan_for(write, text, user_prompt="{{ review }} ({{ stars }} stars)")
    assert plan.ok, plan.errors
    assert user_messages(plan) == ["nice, quick (5 stars)"]


def test_bom_is_ignored(write):
    plan = plan_for(write, "\ufeffreview\nfine\n")
    assert plan.ok and plan.columns == ["review"]


def test_missing_cells_are_empty_and_blank_rows_skipped(write):
    text = "review,product\nlovely,mug\nok\n\n,,\nbad,lamp\n"
    plan = plan_for(write, text, user_prompt="{{ review }} about {{ product }}")
    assert plan.ok, plan.errors
    assert user_messages(plan) == ["lovely about mug", "ok about ", "bad about lamp"]
    # custom_id from the row number counts data rows, not skipped blank lines
    assert [line["custom_id"] for line in plan.preview] == ["row-1", "row-2", "row-3"]


def test_system_prompt_parameters_and_schema(write):
    schema = {"type": "object", "properties": {"sentiment": {"type": "string"}}, "required": ["sentiment"]}
    plan = plan_for(
        write,
        "review,lang\nbien,fr\n",
        system_prompt="Answer in {{ lang }}.",
        temperature=0.2,
        max_tokens=50,
        json_schema=json.dumps(schema),
        extra={"seed": 7},
    )
    assert plan.ok, plan.errors
    body = plan.preview[0]["body"]
    assert body["messages"][0] == {"role": "system", "content": "Answer in fr."}
    assert body["temperature"] == 0.2 and body["max_tokens"] == 50 and body["seed"] == 7
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == schema
    assert plan.preview[0]["url"] == "/v1/chat/completions"
    assert list(body)[:2] == ["model", "messages"]  # the prompt reads first in previews, before the schema


def test_embeddings_from_a_column(write):
    plan = plan_for(
        write,
        "sku,description\nA1,Red chair\nA2,Blue desk\n",
        url="/v1/embeddings",
        model="text-embedding-3-small",
        input_column="description",
        custom_id_column="sku",
    )
    assert plan.ok, plan.errors
    assert plan.preview[1] == {
        "custom_id": "A2",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": "Blue desk"},
    }


def test_unknown_column_is_named(write):
    plan = plan_for(write, "review\nok\n", user_prompt="{{ review }} {{ colour }}")
    assert [e.code for e in plan.errors] == ["unknown_column"]
    assert "colour" in plan.errors[0].message and "review" in plan.errors[0].message


def test_template_errors(write):
    plan = plan_for(write, "review\nok\n", model="", temperature=3, json_schema="{not json", custom_id_column="nope")
    assert sorted(e.code for e in plan.errors) == [
        "invalid_json_schema",
        "invalid_value",
        "missing_model",
        "unknown_column",
    ]


def test_row_errors_have_line_numbers(write):
    text = 'id,review\na,fine\n"b","multi\nline"\na,again\n,empty id\nc,x,extra\nd,\n'
    plan = plan_for(write, text, custom_id_column="id")
    assert [(e.line, e.code) for e in plan.errors] == [
        (5, "duplicate_custom_id"),
        (6, "invalid_custom_id"),
        (7, "too_many_cells"),
    ]
    assert "line 2" in plan.errors[0].message
    # "Review: " alone is not empty, so row d is fine; a prompt of only a placeholder is checked below
    bare = plan_for(write, 'review\n\n ,\nok\n""\n', name="b.csv", user_prompt="{{ review }}")
    assert bare.ok and bare.count == 1


@pytest.mark.parametrize(
    "skipped,code",
    [(b"b,caf\xe9", "invalid_encoding"), (b"b," + b"x" * 200, "line_too_long")],
)
def test_line_numbers_stay_right_after_a_skipped_line(write, skipped, code):
    # A line that is skipped never reaches the csv reader, whose own line count then lags behind.
    text = b"id,review\na,fine\n" + skipped + b'\nc,"two\nlines"\nc,again\nd,x,extra\n'
    limits = ingest.Limits(max_lines=100, max_line_bytes=100, max_file_bytes=10**6)
    template = Template(model="gpt-4o-mini", user_prompt="{{ review }}", custom_id_column="id")
    plan = ingest.validate(write("rows.csv", text), format=Job.Format.CSV, template=template, limits=limits)
    assert [(e.line, e.code) for e in plan.errors] == [(3, code), (6, "duplicate_custom_id"), (7, "too_many_cells")]
    assert "already used on line 4" in plan.errors[1].message


def test_a_cell_may_be_as_long_as_a_line(write):
    review = "x" * 300_000  # csv refuses cells over 131,072 characters unless told otherwise
    plan = plan_for(write, f'id,review\n1,"{review}"\n', custom_id_column="id")
    assert plan.ok, plan.errors
    assert user_messages(plan) == [f"Review: {review}"]


def test_a_cell_longer_than_the_line_limit_is_refused(write):
    # Every line is short enough, but the quoted cell that spans them is not.
    cell = "\n".join(["y" * 60] * 3)
    limits = ingest.Limits(max_lines=100, max_line_bytes=100, max_file_bytes=10**6)
    template = Template(model="gpt-4o-mini", user_prompt="{{ review }}")
    plan = ingest.validate(
        write("rows.csv", f'review\n"{cell}"\nok\n'), format=Job.Format.CSV, template=template, limits=limits
    )
    assert [(e.line, e.code) for e in plan.errors] == [(2, "invalid_csv")]
    assert "the row is longer than 100 characters" in plan.errors[0].message


def test_empty_prompt(write):
    plan = plan_for(write, "review,other\n,x\n", user_prompt="{{ review }}")
    assert [(e.line, e.code) for e in plan.errors] == [(2, "empty_prompt")]


def test_not_utf8(write):
    plan = plan_for(write, "review\ncaf\xe9\n".encode("latin-1"))
    assert [(e.line, e.code) for e in plan.errors] == [(2, "invalid_encoding")]


def test_empty_csv(write):
    assert [e.code for e in plan_for(write, "").errors] == ["empty_file"]
    assert [e.code for e in plan_for(write, "review\n", name="h.csv").errors] == ["empty_file"]


@pytest.mark.django_db
def test_create_job_keeps_input_rows(write, owner):
    plan = plan_for(write, "review,stars\nlovely,5\nmeh\n", user_prompt="{{ review }} ({{ stars }})")
    job = ingest.create_job(plan, owner=owner, name="Reviews")
    assert job.source_format == Job.Format.CSV and job.columns == ["review", "stars"]
    assert job.template["user_prompt"] == "{{ review }} ({{ stars }})"
    rows = [json.loads(i.input_row) for i in job.items.order_by("line")]
    assert rows == [["lovely", "5"], ["meh", ""]]


def test_detect_format(write):
    assert ingest.detect_format("a.csv", write("a.csv", "x\n")) == Job.Format.CSV
    assert ingest.detect_format("a.jsonl", write("a.jsonl", "{}\n")) == Job.Format.JSONL
    assert ingest.detect_format("upload", write("u", '\ufeff {"a":1}\n')) == Job.Format.JSONL
    assert ingest.detect_format("upload", write("v", "a,b\n")) == Job.Format.CSV
