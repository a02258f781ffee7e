"""The files in examples/ are valid uploads, and each CSV + template makes the same requests as its JSONL twin."""

import csv
import io
import json
from dataclasses import fields
from pathlib import Path

import pytest

from jobs import ingest
from jobs.models import Job

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHAT, EMBEDDINGS = "/v1/chat/completions", "/v1/embeddings"

# name -> (requests, url, model)
EXPECTED = {
    "summarise_articles": (12, CHAT, "gpt-4o-mini"),
    "review_sentiment": (15, CHAT, "gpt-4o-mini"),
    "translate_snippets": (12, CHAT, "gpt-4o-mini"),
    "classify_tickets": (15, CHAT, "gpt-4o-mini"),
    "extract_invoices": (10, CHAT, "gpt-4o-mini"),
    "embed_products": (15, EMBEDDINGS, "text-embedding-3-small"),
}
NAMES = sorted(EXPECTED)


def load_template(name: str) -> tuple[dict, ingest.Template]:
    data = json.loads((EXAMPLES / f"{name}.template.json").read_text(encoding="utf-8"))
    return data, ingest.Template.from_dict(data)


def csv_rows(name: str, template: ingest.Template) -> list[dict[str, str]]:
    """The CSV read independently of ingest (BOM stripped, same delimiter rule)."""
    text = (EXAMPLES / f"{name}.csv").read_text(encoding="utf-8-sig")
    delimiter = template.delimiter or max(",;\t|", key=text.partition("\n")[0].count)
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def jsonl_lines(name: str) -> list[dict]:
    with open(EXAMPLES / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_strict_schema(schema: dict, where: str) -> None:
    """What OpenAI's strict structured outputs demand of every object in the schema."""
    if schema.get("type") == "object" or "properties" in schema:
        assert schema.get("additionalProperties") is False, where
        assert sorted(schema.get("required", [])) == sorted(schema["properties"]), where
        for key, sub in schema["properties"].items():
            assert_strict_schema(sub, f"{where}.{key}")
    if isinstance(schema.get("items"), dict):
        assert_strict_schema(schema["items"], f"{where}[]")


def test_every_example_has_all_three_files_and_a_readme_entry():
    assert sorted(p.stem for p in EXAMPLES.glob("*.jsonl")) == NAMES
    readme = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    for name in NAMES:
        assert (EXAMPLES / f"{name}.csv").is_file()
        assert (EXAMPLES / f"{name}.template.json").is_file()
        assert f"`{name}`" in readme


@pytest.mark.parametrize("name", NAMES)
def test_detect_format(name):
    for suffix, expected in ((".jsonl", Job.Format.JSONL), (".csv", Job.Format.CSV)):
        path = EXAMPLES / f"{name}{suffix}"
        assert ingest.detect_format(path.name, path) == expected
        assert ingest.detect_format("upload", path) == expected  # by content when the name says nothing


@pytest.mark.parametrize("name", NAMES)
def test_jsonl_validates(name):
    count, url, model = EXPECTED[name]
    plan = ingest.validate(EXAMPLES / f"{name}.jsonl", single_model=True)
    assert [e.as_dict() for e in plan.errors] == []
    assert plan.ok
    assert (plan.count, plan.url, plan.model) == (count, url, model)
    assert plan.est_input_tokens > 0
    for line in jsonl_lines(name):
        assert line["method"] == "POST" and line["url"] == url
        response_format = line["body"].get("response_format")
        if response_format:
            assert response_format["type"] == "json_schema"
            block = response_format["json_schema"]
            assert block["strict"] is True and block["name"]
            assert_strict_schema(block["schema"], f"{name}:{line['custom_id']}")


@pytest.mark.parametrize("name", NAMES)
def test_csv_with_template_validates(name):
    count, url, model = EXPECTED[name]
    data, template = load_template(name)
    assert set(data) <= {f.name for f in fields(ingest.Template)}, "from_dict would silently drop unknown keys"
    if template.json_schema:
        assert_strict_schema(template.json_schema, name)

    plan = ingest.validate(EXAMPLES / f"{name}.csv", format=Job.Format.CSV, template=template)
    assert [e.as_dict() for e in plan.errors] == []
    assert plan.ok
    assert (plan.count, plan.url, plan.model) == (count, url, model)
    assert plan.count == ingest.validate(EXAMPLES / f"{name}.jsonl").count

    first = csv_rows(name, template)[0]
    assert plan.columns == list(first)
    preview = plan.preview[0]
    assert preview["custom_id"] == first[template.custom_id_column]
    body = preview["body"]
    if url == EMBEDDINGS:
        assert body["input"] == first[template.input_column]
        assert len(body["input"]) > 50
    else:
        user = body["messages"][-1]
        assert user["role"] == "user"
        used = ingest.template_columns(template.user_prompt)
        assert used
        for column in used:
            assert first[column].strip()
            assert first[column] in user["content"]
        assert "{{" not in user["content"]


@pytest.mark.parametrize("name", NAMES)
def test_csv_twin_makes_the_same_requests_as_the_jsonl(name):
    _, template = load_template(name)
    plan = ingest.validate(EXAMPLES / f"{name}.csv", format=Job.Format.CSV, template=template)
    assert plan.ok
    from_csv = list(plan.requests())
    from_jsonl = jsonl_lines(name)
    assert [r.custom_id for r in from_csv] == [line["custom_id"] for line in from_jsonl]
    for request, line in zip(from_csv, from_jsonl):
        a, b = dict(request.body), dict(line["body"])
        # The template's schema is named "output"; the JSONL names its own. The schema itself must match.
        fa, fb = a.pop("response_format", None), b.pop("response_format", None)
        assert (fa is None) == (fb is None)
        if fa:
            assert fa["json_schema"]["schema"] == fb["json_schema"]["schema"]
            assert fa["json_schema"]["strict"] is fb["json_schema"]["strict"] is True
        assert a == b, request.custom_id


def test_the_csvs_exercise_bom_delimiters_and_quoting():
    raw = {name: (EXAMPLES / f"{name}.csv").read_bytes() for name in NAMES}
    assert sum(b.startswith(b"\xef\xbb\xbf") for b in raw.values()) == 1
    assert raw["review_sentiment"].startswith(b"\xef\xbb\xbfreview_id,")
    assert raw["translate_snippets"].startswith(b"id;target_language;text")

    _, template = load_template("review_sentiment")
    plan = ingest.validate(EXAMPLES / "review_sentiment.csv", format=Job.Format.CSV, template=template)
    assert plan.columns[0] == "review_id"  # the BOM is not part of the first column's name

    _, template = load_template("translate_snippets")
    assert template.delimiter == ""  # detected from the header line
    plan = ingest.validate(EXAMPLES / "translate_snippets.csv", format=Job.Format.CSV, template=template)
    assert plan.columns == ["id", "target_language", "text"]

    cells = [
        cell for name in NAMES for _, t in [load_template(name)] for row in csv_rows(name, t) for cell in row.values()
    ]
    assert any('"' in c for c in cells)
    assert any("," in c for c in cells)
    assert any(";" in row["text"] for row in csv_rows("translate_snippets", template))  # quoted delimiter
    assert any("\n" in c for c in cells)
    assert any(not c.isascii() for c in cells)
