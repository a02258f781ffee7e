"""Property-based fuzzing of ingestion: whatever the bytes, validation gives a plan or line errors,
never an exception, and a plan without errors becomes a job.

Derandomized (a fixed sequence of examples, the same in CI and on every machine) and sized to
run in well under 30 s.
"""

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from jobs import ingest
from jobs.models import SUPPORTED_URLS, Job

FUZZ = settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def no_job_quota(settings):
    """Hypothesis makes a job of every example, all one member's and never run: no cap on jobs in flight here."""
    settings.BATCHSITE_MAX_ACTIVE_JOBS = 0


# Small limits so that the limit paths (long lines, many lines, big files) are reached too.
LIMITS = st.sampled_from(
    [
        ingest.Limits(max_lines=1000, max_line_bytes=100_000, max_file_bytes=10**7),
        ingest.Limits(max_lines=1000, max_line_bytes=100_000, max_file_bytes=10**7),
        ingest.Limits(max_lines=3, max_line_bytes=120, max_file_bytes=2000),
    ]
)


def assert_plan_or_line_errors(plan: ingest.Plan) -> None:
    assert plan.ok == (plan.error_count == 0) == (not plan.errors)
    if plan.ok:
        assert plan.count > 0 and len(plan.est_tokens) == plan.count
        json.dumps(plan.preview, ensure_ascii=False).encode()  # what the review page shows, storable
    else:
        assert plan.error_count >= len(plan.errors) > 0 and plan.count >= 0
    for error in plan.errors:
        assert error.line is None or error.line >= 1
        assert isinstance(error.code, str) and error.message and len(error.message) <= 1001


def ingest_file(tmp_path, content: bytes, *, name: str, owner=None, **options) -> ingest.Plan:
    path = tmp_path / name
    path.write_bytes(content)
    plan = ingest.validate(path, **options)
    assert_plan_or_line_errors(plan)
    event("a plan" if plan.ok else "line errors")  # --hypothesis-show-statistics: both are reached
    if plan.ok:
        requests = list(plan.requests())  # the second pass agrees with the first
        assert len(requests) == plan.count
        if owner is not None:
            job = ingest.create_job(plan, owner=owner)
            assert job.items.count() == plan.count
    return plan


def mostly(valid, noise):
    """`valid` nine times in ten, else `noise`: near-valid input, so that plans are reached too."""
    return st.integers(0, 9).flatmap(lambda n: noise if n == 5 else valid)  # 5: Hypothesis favours the ends


# JSON values of every shape, including deep ones.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
texts = st.text(min_size=1, max_size=20) | st.sampled_from([" x", "\u2028", "{{ x }}", "=1+1", "\x00", "😀"])
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_text"]), "text": texts})
message = st.fixed_dictionaries(
    {
        "role": mostly(st.sampled_from(["user", "system", "assistant"]), json_values),
        "content": mostly(texts | st.lists(part, min_size=1, max_size=3), json_values),
    }
)
token_arrays = st.lists(st.integers(min_value=0, max_value=200_000), min_size=1, max_size=4)
BODY = {
    "/v1/chat/completions": {"messages": st.lists(message, min_size=1, max_size=3)},
    "/v1/embeddings": {  # texts, or token arrays with now and then a stray value after the first
        "input": texts
        | token_arrays
        | st.lists(texts, min_size=1, max_size=2)
        | st.tuples(token_arrays, st.lists(token_arrays | scalars, max_size=2)).map(lambda t: [t[0], *t[1]])
    },
    "/v1/completions": {"prompt": texts | token_arrays},
    "/v1/responses": {"input": texts | st.lists(message, min_size=1, max_size=2), "instructions": st.none() | texts},
}
OPTIONAL = {
    "max_tokens": st.integers(-1, 10**6),
    "max_completion_tokens": st.integers(1, 100),
    "stream": st.booleans(),
    "tools": json_values,
    "response_format": json_values,
    "metadata": json_values,
}


@st.composite
def bodies(draw, url: str) -> dict:
    models = st.sampled_from(["gpt-4o-mini", "gpt-4-0613", "text-embedding-3-small"])
    body = {"model": draw(mostly(models, st.sampled_from(["", " ", "a\x00"]) | json_values))}
    body.update((key, draw(value)) for key, value in BODY.get(url, BODY["/v1/chat/completions"]).items())
    body.update((key, draw(OPTIONAL[key])) for key in draw(st.sets(st.sampled_from(sorted(OPTIONAL)), max_size=2)))
    if draw(st.integers(0, 9)) == 5:  # one field missing or of any shape
        key = draw(st.sampled_from(sorted(body)))
        if draw(st.booleans()):
            del body[key]
        else:
            body[key] = draw(json_values)
    return body


@st.composite
def near_valid_lines(draw, url: str) -> bytes:
    line = {
        "custom_id": draw(
            mostly(st.text(min_size=1, max_size=8), st.sampled_from(["", "a", "a" * 1025, "\x00"]) | json_values)
        ),
        "method": draw(mostly(st.just("POST"), st.sampled_from(["post", "GET"]) | json_values)),
        "url": draw(mostly(st.just(url), st.sampled_from([*SUPPORTED_URLS, "/v1/moderations", "v1/x"]) | json_values)),
        "body": draw(mostly(bodies(url), json_values)),
    }
    if draw(st.integers(0, 19)) == 5:
        del line[draw(st.sampled_from(sorted(line)))]
    text = json.dumps(line, ensure_ascii=draw(st.booleans()))
    damage = draw(st.sampled_from(["none"] * 15 + ["cut", "insert", "deep", "huge number", "not an object"]))
    if damage == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif damage == "insert":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at] + draw(st.sampled_from(["{", "}", "[", '"', ",", "\\", "\n", "\\ud83d", "NaN", "\r"])) + text[at:]
        )
    elif damage == "deep":
        depth = draw(st.sampled_from([97, 101, 5000, 100_000]))
        text = text[:-1] + ', "x": ' + "[" * depth + "]" * draw(st.sampled_from([0, depth])) + "}"
    elif damage == "huge number":
        text = text[:-1] + ', "x": ' + "9" * 5000 + "}"
    elif damage == "not an object":
        text = json.dumps(draw(json_values))
    return text.encode()


@pytest.mark.django_db
@FUZZ
@given(
    lines=st.sampled_from([*SUPPORTED_URLS]).flatmap(
        lambda url: st.lists(near_valid_lines(url), min_size=1, max_size=4)
    ),
    ending=st.sampled_from([b"\n", b"\r\n"]),
    bom=st.booleans(),
    limits=LIMITS,
    single_model=st.booleans(),
)
def test_near_valid_jsonl_gives_a_plan_or_line_errors(tmp_path, owner, lines, ending, bom, limits, single_model):
    content = (b"\xef\xbb\xbf" if bom else b"") + ending.join(lines) + ending
    ingest_file(tmp_path, content, name="f.jsonl", owner=owner, limits=limits, single_model=single_model)


@settings(FUZZ, max_examples=500)
@given(content=st.binary(max_size=600) | st.text(max_size=300).map(str.encode), limits=LIMITS)
def test_any_bytes_as_jsonl_give_line_errors(tmp_path, content, limits):
    ingest_file(tmp_path, content, name="f.jsonl", limits=limits, expected_url="/v1/chat/completions")


cell_text = st.text(alphabet=st.sampled_from(list('ab ,;|\t"\n\r{}=é') + ["\u2028", "\x00"]), max_size=10)


@st.composite
def csv_files(draw) -> tuple[bytes, ingest.Template]:
    good_header = st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=4, unique=True)
    header = draw(mostly(good_header, st.lists(cell_text, min_size=1, max_size=4)))
    cells = mostly(st.text('xyz ,"\n', min_size=1, max_size=8), cell_text)
    rows = draw(st.lists(st.lists(cells, max_size=len(header) + 1), max_size=6))
    delimiter = draw(st.sampled_from([",", ";", "\t", "|"]))
    if draw(mostly(st.just(True), st.just(False))):  # written by csv: well quoted
        out = io.StringIO()
        writer = csv.writer(out, delimiter=delimiter, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
        writer.writerow(header)
        writer.writerows(rows)
        text = out.getvalue()
    else:  # quotes and delimiters as they come
        text = "\n".join(delimiter.join(row) for row in [header, *rows])
    names = [h.strip() for h in header]
    used = draw(st.lists(mostly(st.sampled_from(names), st.just("missing")), max_size=3))
    schemas = st.sampled_from(
        ['{"type": "object"}', "{no", "[1]", '{"a": "\\u0000"}', '{"a": ' + "[" * 5000 + "]" * 5000 + "}"]
    )
    template = ingest.Template(
        model=draw(mostly(st.just("gpt-4o-mini"), st.sampled_from(["", " "]))),
        url=draw(mostly(st.just("/v1/chat/completions"), st.sampled_from(["/v1/embeddings", "/v1/completions"]))),
        user_prompt="Say: " + " ".join(f"{{{{ {n} }}}}" for n in used) + draw(mostly(st.just(""), cell_text)),
        system_prompt=draw(st.sampled_from(["", f"Be brief. {{{{ {names[0]} }}}}"])),
        custom_id_column=draw(mostly(st.just(""), st.sampled_from(["missing", *names]))),
        input_column=draw(st.sampled_from(["", *names])),
        temperature=draw(mostly(st.none(), st.floats(allow_nan=False, min_value=-1, max_value=3))),
        max_tokens=draw(mostly(st.none(), st.integers(-1, 100))),
        json_schema=draw(mostly(st.none(), schemas)),
        delimiter=draw(st.sampled_from(["", delimiter])),
    )
    return text.encode(), template


@pytest.mark.django_db
@FUZZ
@given(file=csv_files(), limits=LIMITS)
def test_near_valid_csv_gives_a_plan_or_line_errors(tmp_path, owner, file, limits):
    content, template = file
    ingest_file(tmp_path, content, name="f.csv", owner=owner, format=Job.Format.CSV, template=template, limits=limits)


@settings(FUZZ, max_examples=500)
@given(
    content=st.binary(max_size=600) | st.text(max_size=300).map(str.encode),
    limits=LIMITS,
    prompt=st.sampled_from(["Describe the row.", "{{ a }}{{b}}"]),
)
def test_any_bytes_as_csv_give_a_plan_or_line_errors(tmp_path, content, limits, prompt):
    template = ingest.Template(model="gpt-4o-mini", user_prompt=prompt)
    ingest_file(tmp_path, content, name="f.csv", format=Job.Format.CSV, template=template, limits=limits)
