"""Attacks on ingestion and export, performed over HTTP: catastrophic regex backtracking, uploads
that would fill memory or hold a worker, JSON nested past the recursion limit, and formulas in
results.csv."""

import csv
import io
import json
import re
import threading
import time
import tracemalloc

import httpx2
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs import ingest
from jobs.engine.tasks import validate_batch
from jobs.models import Item, Job
from tests.factories import api_headers, chat_line, make_endpoint

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("data_dir")]

# `{{` then spaces: the old placeholder pattern `\{\{\s*(.*?)\s*\}\}` tried every split of the
# spaces between its three repeats, cubic in their number (4,000 spaces: 19 s; a megabyte: ages).
# The final dot keeps the form from stripping the spaces away.
ONE_MB_PROMPT = "{{" + " " * (1024 * 1024) + "."
# Under the length cap, so validation really renders it into every row.
LONG_PROMPT = "{{" + " " * (ingest.MAX_PROMPT_CHARS - 100) + "{{ review }}"


@pytest.fixture
def endpoint():
    return make_endpoint("http://127.0.0.1:9/v1")


def upload(client, name: str, content: bytes) -> str:
    response = client.post("/jobs/new/", {"file": SimpleUploadedFile(name, content)})
    assert response.status_code == 302, response.content[:500]
    return response.url


def template_form(endpoint, **fields) -> dict:
    return {
        "name": "Reviews",
        "endpoint": endpoint.pk,
        "max_attempts": 5,
        "url": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "user_prompt": "{{ review }}",
        "action": "check",
        **fields,
    }


def timed(call):
    """(result, CPU seconds this thread spent on the call): what the input costs us, the same whether or not
    the machine is busy with other work (the suite's two passes run side by side on two cores)."""
    started = time.thread_time()
    result = call()
    return result, time.thread_time() - started


# Item 1: regular expressions that see user text are linear


@pytest.mark.parametrize(
    "text",
    [
        "{{" + " " * 1_000_000,
        "{{" * 500_000,
        "{{ " * 333_333,
        "{{\n" * 333_333,
        "{{" + "x" * 1_000_000 + "}",
        "{{ a }" * 200_000,
    ],
    ids=["spaces", "openers", "openers-spaces", "openers-newlines", "unclosed", "half-closed"],
)
def test_placeholders_are_found_in_linear_time(text):
    _, seconds = timed(lambda: (ingest.template_columns(text), ingest._render(text, {"a": "b"})))
    assert seconds < 1  # about 0.02 s; the old pattern did not finish


def test_placeholders_keep_their_meaning():
    text = "{{a}} {{ b c }} {{\n d \n}} {{ e\nf }} {{}} {{ missing }}"
    assert ingest.template_columns(text) == ["a", "b c", "d", "", "missing"]  # a name never spans lines
    cells = {"a": "1", "b c": "2", "d": "3"}
    assert ingest._render(text, cells) == "1 2 3 {{ e\nf }} {{}} {{ missing }}"


def test_go_durations_from_a_hostile_server_are_parsed_in_linear_time():
    from jobs.engine.ratelimit import parse_duration

    result, seconds = timed(lambda: parse_duration("1" * 100_000 + "x"))  # 40,000 digits took 33 s
    assert result is None and seconds < 0.1
    assert parse_duration("6m0s") == 360 and parse_duration("1h2m3.5s") == 3723.5


def test_megabyte_prompts_are_refused_at_once_and_long_ones_checked_at_once(client, owner, endpoint):
    client.force_login(owner)
    url = upload(client, "reviews.csv", b"review\nLovely\nBroken\n")
    client.post(url, template_form(endpoint, user_prompt="warm-up {{ review }}"))  # tokenizer loaded

    response, seconds = timed(lambda: client.post(url, template_form(endpoint, user_prompt=ONE_MB_PROMPT)))
    page = response.content.decode()
    assert response.status_code == 200 and seconds < 1
    assert f"This is too long: at most {ingest.MAX_PROMPT_CHARS:,} characters (it has 1048579)." in page

    form = template_form(endpoint, system_prompt=LONG_PROMPT, user_prompt=LONG_PROMPT)
    response, seconds = timed(lambda: client.post(url, form))
    assert response.status_code == 200 and seconds < 1
    assert "All 2 requests are valid" in response.content.decode()

    schema = '{"type": ' + "[" * 60_000
    response = client.post(url, template_form(endpoint, json_schema=schema))
    assert response.status_code == 200  # RecursionError in the form was a 500
    assert f"The schema nests more than {ingest.MAX_DEPTH} levels deep." in response.content.decode()
    assert Job.objects.count() == 0


def test_a_template_that_amplifies_a_cell_is_refused_at_once_on_check_and_on_launch(client, owner, endpoint):
    """Issue 21's attack: a one-row CSV with a 20 KB cell and a prompt of {{a}} 10,000 times renders to 200 MB;
    the check answered after more than 90 s. The row's size is worked out before anything is rendered."""
    client.force_login(owner)
    url = upload(client, "amplify.csv", b"a\n" + b"x" * 20_000 + b"\n")
    amplifier = "{{a}}" * 10_000

    for action in ("check", "launch"):
        started = time.perf_counter()
        form = template_form(endpoint, user_prompt=amplifier, action=action)
        response, seconds = timed(lambda form=form: client.post(url, form))
        wall = time.perf_counter() - started
        page = response.content.decode()
        assert response.status_code == 200 and seconds < 1 and wall < 5, (action, seconds, wall)
        assert "the prompt filled in with this row would take 200,050,000 bytes" in page, action
    assert Job.objects.count() == 0


def test_rendered_requests_are_sized_before_they_are_made(write):
    big_cell = "é" * 600  # 1,200 bytes
    path = write("rows.csv", "a,b\n" + "\n".join(f"{big_cell},{i}" for i in range(20)) + "\n")
    limits = ingest.Limits(max_lines=1000, max_line_bytes=10_000, max_file_bytes=10**9)
    template = ingest.Template(model="gpt-4o-mini", user_prompt="{{a}}" * 8 + " {{b}}", system_prompt="{{ a }}")

    plan = ingest.validate(path, format=Job.Format.CSV, template=template, limits=limits)
    assert [e.code for e in plan.errors][:1] == ["request_too_large"]  # 9 x 1,200 bytes and the template
    assert plan.errors[0].line == 2

    limits = ingest.Limits(max_lines=1000, max_line_bytes=20_000, max_file_bytes=50_000)
    plan = ingest.validate(path, format=Job.Format.CSV, template=template, limits=limits)
    assert [(e.code, e.line) for e in plan.errors] == [
        ("job_too_large", 6)
    ]  # ~10.9 KB a row: the fifth row passes the bound


def test_template_texts_over_the_cap_are_refused_whatever_the_caller(write):
    template = ingest.Template(
        model="gpt-4o-mini", user_prompt=ONE_MB_PROMPT, json_schema="{}" + " " * ingest.MAX_SCHEMA_CHARS
    )
    (plan, seconds) = timed(
        lambda: ingest.validate(write("r.csv", "review\nok\n"), format=Job.Format.CSV, template=template)
    )
    assert [(e.code, e.param) for e in plan.errors] == [
        ("invalid_value", "user_prompt"),
        ("invalid_value", "json_schema"),
    ]
    assert "longer than 200,000 characters" in plan.errors[0].message and seconds < 1


@pytest.mark.slow
def test_the_dashboard_stays_up_while_adversarial_prompts_are_posted(web_server, client, owner, endpoint, settings):
    """Two requests with a megabyte prompt each used to hold both gunicorn workers (and their GIL) for minutes."""
    client.force_login(owner)
    url = upload(client, "reviews.csv", b"review\nLovely\nBroken\n")
    client.get(url)  # sets the CSRF cookie
    server = web_server(SECRET_KEY=settings.SECRET_KEY)  # the session signed here is valid there
    cookies = {"sessionid": client.cookies["sessionid"].value, "csrftoken": client.cookies["csrftoken"].value}
    form = template_form(endpoint, user_prompt=ONE_MB_PROMPT, csrfmiddlewaretoken=cookies["csrftoken"])
    for _ in range(4):  # every worker has served a page before the clock starts
        assert httpx2.get(server.url + "/login/", timeout=30).status_code == 200

    answers = []

    def attack():
        response, seconds = timed(lambda: httpx2.post(server.url + url, data=form, cookies=cookies, timeout=300))
        answers.append((response.status_code, seconds, "This is too long" in response.text))

    attackers = [threading.Thread(target=attack) for _ in range(2)]
    for thread in attackers:
        thread.start()
    health = []
    while any(thread.is_alive() for thread in attackers) or len(health) < 5:
        try:
            response, seconds = timed(lambda: httpx2.get(server.url + "/login/", timeout=10))
            health.append((response.status_code, seconds))
        except httpx2.TimeoutException:
            health.append((None, 10))
        time.sleep(0.05)
    for thread in attackers:
        thread.join()
    assert [(status, refused) for status, _, refused in answers] == [(200, True), (200, True)]
    assert max(seconds for _, seconds, _ in answers) < 1, answers
    assert all(status == 200 for status, _ in health) and max(seconds for _, seconds in health) < 1, health


# Item 5: bounded memory and CPU for any upload


def test_a_line_without_end_is_skipped_in_bounded_memory(tmp_path):
    path = tmp_path / "one-line.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"custom_id": "')
        for _ in range(96):
            f.write(b"x" * (1024 * 1024))  # 96 MB and no newline
    limits = ingest.Limits(max_lines=10, max_line_bytes=8 * 1024 * 1024, max_file_bytes=10**9)
    tracemalloc.start()
    try:
        plan, seconds = timed(lambda: ingest.validate(path, limits=limits))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(e.line, e.code) for e in plan.errors] == [(1, "line_too_long")]
    assert plan.errors[0].message == f"Line 1 is {path.stat().st_size:,} bytes; the limit is 8,388,608."
    assert peak < 20 * 1024 * 1024, f"peak {peak / 2**20:.0f} MB"  # the line limit and a chunk, not the file
    assert seconds < 10


def test_lines_after_an_over_long_line_are_still_read(write):
    limits = ingest.Limits(max_lines=10, max_line_bytes=1000, max_file_bytes=10**9)
    path = write("f.jsonl", b"x" * 5000 + b"\n" + json.dumps(chat_line("a")).encode() + b"\n" + b"\xef\xbb\xbf{")
    plan = ingest.validate(path, limits=limits)
    assert [(e.line, e.code) for e in plan.errors] == [(1, "line_too_long"), (3, "invalid_json_line")]
    assert plan.count == 1
    # A byte-order mark counts only at the start of the file, and not towards the first line's length.
    line = json.dumps(chat_line("a", "y" * (999 - len(json.dumps(chat_line("a", "")))))).encode() + b"\n"
    assert len(line) == limits.max_line_bytes
    assert ingest.validate(write("g.jsonl", b"\xef\xbb\xbf" + line), limits=limits).ok


def test_a_csv_row_spread_over_many_lines_is_bounded_like_a_line(write):
    # csv's field limit caps each cell, not how many quoted cells one row gathers over lines.
    cells = ",".join(['"' + "y\n" * 30 + '"'] * 50)
    limits = ingest.Limits(max_lines=10_000, max_line_bytes=1000, max_file_bytes=10**9)
    template = ingest.Template(model="gpt-4o-mini", user_prompt="{{ a }}")
    plan = ingest.validate(
        write("r.csv", "a\n" + cells + "\nok\n"), format=Job.Format.CSV, template=template, limits=limits
    )
    assert [(e.line, e.code) for e in plan.errors] == [(2, "invalid_csv")]
    assert "the row is longer than 1,000 characters" in plan.errors[0].message


def test_a_header_of_a_million_columns_is_refused(write):
    template = ingest.Template(model="gpt-4o-mini", user_prompt="{{ a }}")

    def check(text):
        return timed(lambda: ingest.validate(write("r.csv", text), format=Job.Format.CSV, template=template))

    plan, seconds = check("a" + "," * 1_000_000 + "\nx\n")
    assert [(e.line, e.code) for e in plan.errors] == [(1, "too_many_columns")] and seconds < 5
    # Repeated names were counted with list.count for each column: quadratic.
    plan, seconds = check(",".join(["a"] * 16_000) + "\nx\n")
    assert (plan.errors[0].line, plan.errors[0].code) == (1, "duplicate_column") and seconds < 5


def test_error_messages_quote_at_most_a_line_of_the_file(write):
    lines = [{**chat_line(f"r{i}"), "method": "G" * 100_000, "url": "/" * 100_000} for i in range(3)]
    plan = ingest.validate(write("f.jsonl", lines))
    assert [e.code for e in plan.errors] == ["invalid_method", "invalid_url"] * 3
    assert all(len(e.message) < 300 for e in plan.errors)


def test_the_review_page_validates_an_upload_once(client, owner, endpoint, monkeypatch):
    runs = []
    validate = ingest.validate
    for module in (ingest, ingest.plan):  # the views call ingest.validate; checked() calls plan.validate
        monkeypatch.setattr(module, "validate", lambda *a, **kw: runs.append(a) or validate(*a, **kw))
    client.force_login(owner)
    url = upload(client, "in.jsonl", json.dumps(chat_line("a")).encode() + b"\n{nope\n")
    for _ in range(3):
        page = client.get(url).content.decode()
        assert "1 problem" in page and "Line 2 is not valid JSON" in page
    assert len(runs) == 1

    good = upload(client, "good.jsonl", b"".join(json.dumps(chat_line(f"r{i}")).encode() + b"\n" for i in range(3)))
    for _ in range(3):
        assert "All 3 requests are valid" in client.get(good).content.decode()
    assert len(runs) == 2
    response = client.post(good, {"name": "x", "endpoint": endpoint.pk, "max_attempts": 5, "action": "launch"})
    assert response.status_code == 302 and len(runs) == 3  # launching validates afresh
    assert Job.objects.get().total == 3

    reviews = upload(client, "reviews.csv", b"review\nLovely\nBroken\n")
    for _ in range(3):
        assert 'data-insert="review"' in client.get(reviews).content.decode()
    assert len(runs) == 4  # the header, once
    for prompt in ("A: {{ review }}", "A: {{ review }}", "B: {{ review }}", "A: {{ review }}"):
        assert (
            "All 2 requests are valid"
            in client.post(reviews, template_form(endpoint, user_prompt=prompt)).content.decode()
        )
    assert len(runs) == 7  # again only when the template changed


def test_an_upload_cannot_be_named_like_the_remembered_check(client, owner):
    client.force_login(owner)
    url = upload(client, ingest.CHECKED_NAME, json.dumps(chat_line("a")).encode() + b"\n")
    assert "All 1 requests are valid" in client.get(url).content.decode()
    assert "All 1 requests are valid" in client.get(url).content.decode()


DEEP_LINES = [
    b"[" * 100_000,
    b'{"custom_id": "a", "body": ' + b'{"a": ' * 100_000,
    json.dumps(
        {**chat_line("deep"), "body": {**chat_line("x")["body"], "metadata": json.loads("[" * 150 + "]" * 150)}}
    ).encode(),
]


def test_deeply_nested_json_is_a_line_error(write):
    path = write("deep.jsonl", b"\n".join([*DEEP_LINES, json.dumps(chat_line("ok")).encode()]))
    plan = ingest.validate(path)
    assert [(e.line, e.code) for e in plan.errors] == [(n, "invalid_json_line") for n in (1, 2, 3)]
    assert all(f"nests JSON more than {ingest.MAX_DEPTH} levels deep" in e.message for e in plan.errors)
    nested = {**chat_line("fine"), "body": {**chat_line("x")["body"], "metadata": json.loads("[" * 90 + "]" * 90)}}
    assert ingest.validate(write("ok.jsonl", [nested])).ok  # deep, but within the limit


def test_deeply_nested_json_gives_a_failed_batch_over_the_api(client, owner, endpoint):
    headers = api_headers(owner)
    content = b"\n".join([json.dumps(chat_line("ok")).encode(), *DEEP_LINES, b"1" * 5000])
    response = client.post(
        "/v1/files", {"file": SimpleUploadedFile("deep.jsonl", content), "purpose": "batch"}, headers=headers
    )
    assert response.status_code == 200, response.content
    body = {"input_file_id": response.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    response = client.post("/v1/batches", body, content_type="application/json", headers=headers)
    assert response.status_code == 200, response.content[:500]  # was a 500 (RecursionError)
    validate_batch(response.json()["batchsite"]["job_id"])  # the worker's part, here
    batch = client.get(f"/v1/batches/{response.json()['id']}", headers=headers).json()
    assert batch["status"] == "failed"
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [(n, "invalid_json_line") for n in (2, 3, 4, 5)]
    assert "4300" in batch["errors"]["data"][3]["message"].replace(",", "")  # a number too long for Python


# Item 7: no formula runs from results.csv


FORMULA_CSV = (
    b'id,=cmd|"/c calc"!A1,+sum,-minus,@at,"\ttab",plain\n'
    b'=id1,=HYPERLINK("http://evil"),+1+1,-2+3,@SUM(A1),"\tx","\rcr"\n'
    b"-7,a,b,c,d,e,f\n"
)
DANGEROUS = ("=", "+", "-", "@", "\t", "\r")


def test_results_csv_neutralises_every_formula(client, owner, endpoint):
    client.force_login(owner)
    url = upload(client, "formulas.csv", FORMULA_CSV)
    columns = ["id", '=cmd|"/c calc"!A1', "+sum", "-minus", "@at", "tab", "plain"]  # a header cell is stripped
    response = client.post(
        url,
        {
            **template_form(
                endpoint,
                user_prompt="{{ plain }} {{ +sum }}",
                custom_id_column="id",
                json_schema='{"type": "object", "properties": {"=f": {"type": "string"}}}',
            ),
            "action": "launch",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    job = Job.objects.get()
    assert job.columns == columns
    answer = {"choices": [{"message": {"role": "assistant", "content": json.dumps({"=f": "@evil()"})}}]}
    Item.objects.filter(job=job, custom_id="=id1").update(
        status=Item.Status.SUCCEEDED, http_status=200, response=json.dumps(answer)
    )
    Item.objects.filter(job=job, custom_id="-7").update(
        status=Item.Status.FAILED, http_status=400, error_message="=bad"
    )

    response = client.get(f"/jobs/{job.pk}/download/csv")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0][:7] == ["id", '\'=cmd|"/c calc"!A1', "'+sum", "'-minus", "'@at", "tab", "plain"]
    assert rows[0][7:] == ["output", "'=f", "status", "error", "prompt_tokens", "completion_tokens", "latency_ms"]
    assert rows[1][:7] == ["'=id1", '\'=HYPERLINK("http://evil")', "'+1+1", "'-2+3", "'@SUM(A1)", "'\tx", "'\rcr"]
    assert rows[1][8] == "'@evil()"
    assert rows[2][0] == "-7"  # a plain negative number stays a number
    for row in rows:
        for cell in row:
            assert not cell.startswith(DANGEROUS) or re.fullmatch(r"-\d+", cell), (cell, row)


def test_results_csv_of_a_jsonl_job_neutralises_custom_ids(write, owner):
    from jobs import export

    job = ingest.create_job(
        ingest.validate(write("f.jsonl", [chat_line("=1+1"), chat_line("@x"), chat_line("ok")])), owner=owner
    )
    rows = list(csv.reader(io.StringIO("".join(export.results_csv(job)))))
    assert [row[0] for row in rows] == ["custom_id", "'=1+1", "'@x", "ok"]


def test_html_of_the_refused_prompt_is_escaped(client, owner, endpoint):
    client.force_login(owner)
    url = upload(client, "reviews.csv", b"review\nok\n")
    page = client.post(url, template_form(endpoint, user_prompt="<script>x</script>{{ nope }}")).content.decode()
    assert "<script>x</script>" not in page and re.search(r"no column &#x27;nope&#x27;", page)
