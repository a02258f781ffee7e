"""Dashboard pages with Django's test client: flows, permissions, escaping, query counts."""

import json
import re
import time
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from jobs.models import Endpoint, Item, Job, JobTick, control, ledger
from tests.factories import chat_line, jsonl, make_endpoint, make_job

pytestmark = pytest.mark.django_db


@pytest.fixture
def endpoint():
    return make_endpoint("http://127.0.0.1:9/v1", rpm=600)


def upload(client, name, content: bytes):
    response = client.post("/jobs/new/", {"file": SimpleUploadedFile(name, content)})
    assert response.status_code == 302, response.content[:500]
    return response.url


def test_upload_bad_jsonl_shows_line_numbered_errors_and_creates_nothing(client, owner, endpoint):
    client.force_login(owner)
    url = upload(client, "bad.jsonl", jsonl([chat_line("a")]) + b'{"custom_id": "b",\n' + jsonl([chat_line("a")]))
    page = client.get(url).content.decode()
    assert "2 problems" in page
    assert "Line 2 is not valid JSON" in page and "already used on line 1" in page
    assert 'value="launch"' in page and "disabled" in page
    assert Job.objects.count() == 0


def test_upload_good_jsonl_preview_estimate_launch(client, owner, endpoint, django_capture_on_commit_callbacks):
    client.force_login(owner)
    url = upload(client, "reviews.jsonl", jsonl([chat_line(f"r{i}", f"Review {i}", max_tokens=50) for i in range(30)]))
    page = client.get(url).content.decode()
    assert "All 30 requests are valid" in page
    assert "&quot;custom_id&quot;: &quot;r0&quot;" in page  # the preview, escaped
    assert "Input tokens (est.)" in page and "min" in page  # 30 requests at 600 RPM
    assert Job.objects.count() == 0
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(
            url, {"name": "My reviews", "endpoint": endpoint.pk, "max_attempts": 5, "action": "launch", "mode": "live"}
        )
    job = Job.objects.get()
    assert response.status_code == 302 and response.url == f"/jobs/{job.pk}/"
    assert (job.name, job.total, job.owner, job.endpoint) == ("My reviews", 30, owner, endpoint)
    assert len(callbacks) == 1  # the slices are enqueued once the job is committed
    assert client.get(url).status_code == 302  # the upload is used up


def test_csv_template_errors_then_launch(client, owner, endpoint):
    client.force_login(owner)
    url = upload(client, "tickets.csv", b'id,ticket\nT1,"Printer on fire, again"\nT2,Cannot log in\n')
    page = client.get(url).content.decode()
    assert 'data-insert="ticket"' in page and "data-preset=" in page
    form = {
        "name": "Tickets",
        "endpoint": endpoint.pk,
        "max_attempts": 5,
        "url": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "user_prompt": "Classify: {{ tiket }}",
        "custom_id_column": "id",
        "action": "check",
    }
    page = client.post(url, form).content.decode()
    assert "no column &#x27;tiket&#x27;" in page and Job.objects.count() == 0
    # A setting the form refuses is listed in the Check panel, and nothing can launch until it is fixed
    page = client.post(
        url, {**form, "user_prompt": "Classify: {{ ticket }}", "json_schema": "{not json"}
    ).content.decode()
    assert "Some settings need fixing" in page and "<li><strong>JSON schema</strong>: Not valid JSON" in page
    assert "Fill in the template" not in page
    assert re.search(r'value="launch"[^>]*disabled', page)
    form["user_prompt"] = "Classify: {{ ticket }}"
    page = client.post(url, form).content.decode()
    assert "All 2 requests are valid" in page and "Classify: Printer on fire, again" in page
    form["action"] = "launch"
    response = client.post(url, form, HTTP_HX_REQUEST="true")
    job = Job.objects.get()
    assert response.headers["HX-Redirect"] == f"/jobs/{job.pk}/"
    assert job.source_format == Job.Format.CSV and job.columns == ["id", "ticket"]
    assert list(job.items.values_list("custom_id", flat=True)) == ["T1", "T2"]


def test_upload_too_large_is_a_clear_message(client, owner, settings):
    settings.BATCHSITE_MAX_UPLOAD_MB = 0
    client.force_login(owner)
    response = client.post("/jobs/new/", {"file": SimpleUploadedFile("a.jsonl", b"x" * 100)})
    assert (
        response.status_code == 413 and "larger than the 0 MB limit" in response.content.decode()
    )  # jobs/middleware.py


def test_model_output_and_custom_id_are_escaped(client, owner, endpoint, write):
    job = make_job(write, owner, endpoint, 1, text=lambda i: "<img src=x onerror=alert(1)>", start=False)
    item = job.items.get()
    payload = "<script>alert('xss')</script>"
    body = {
        "choices": [{"message": {"role": "assistant", "content": payload}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    Item.objects.filter(pk=item.pk).update(
        status=Item.Status.SUCCEEDED, response=json.dumps(body), custom_id=payload, http_status=200
    )
    client.force_login(owner)
    for url in (f"/jobs/{job.pk}/items/{item.pk}/", f"/jobs/{job.pk}/items/"):
        page = client.get(url).content.decode()
        assert payload not in page and "&lt;script&gt;alert(&#x27;xss&#x27;)&lt;/script&gt;" in page
        assert "<img src=x" not in page


def test_item_browser_filters_and_searches(client, owner, endpoint, write):
    job = make_job(write, owner, endpoint, 120, start=False)
    Item.objects.filter(job=job, line__lte=10).update(status=Item.Status.FAILED, error_message="boom")
    ledger.recount(job)
    client.force_login(owner)
    page = client.get(f"/jobs/{job.pk}/items/?status=failed").content.decode()
    assert page.count("boom") == 10 and "Page 1 of 1" in page
    page = client.get(f"/jobs/{job.pk}/items/?q=req-11").content.decode()
    assert "req-11<" in page and "req-110<" in page and "req-12<" not in page
    page = client.get(f"/jobs/{job.pk}/items/?page=3").content.decode()
    assert "Page 3 of 3" in page


@pytest.mark.parametrize("url", ["/endpoints/", "/endpoints/new/", "/team/"])
def test_member_gets_a_clear_403_on_staff_pages(client, owner, url):
    client.force_login(owner)
    assert client.get(url).status_code == 403  # not a redirect loop via the login page


def test_staff_adds_an_endpoint_whose_key_is_never_shown(client, staff):
    client.force_login(staff)
    response = client.post(
        "/endpoints/new/",
        {"name": "vLLM", "base_url": "http://127.0.0.1:9/v1", "concurrency": 50, "api_key": "sk-supersecret-abcd1234"},
    )
    assert response.status_code == 302
    endpoint = Endpoint.objects.get(name="vLLM")
    assert endpoint.api_key == "sk-supersecret-abcd1234"
    for url in ("/endpoints/", f"/endpoints/{endpoint.pk}/"):
        page = client.get(url).content.decode()
        assert "supersecret" not in page and "…1234" in page


def test_editing_an_endpoint_without_a_key_keeps_the_stored_one(client, staff, endpoint):
    client.force_login(staff)
    client.post(f"/endpoints/{endpoint.pk}/", {"name": "vLLM", "base_url": "http://127.0.0.1:9/v1", "concurrency": 10})
    assert Endpoint.objects.get(pk=endpoint.pk).api_key == "sk-test-simulator-key"


def test_endpoint_test_says_when_the_server_cannot_be_reached(client, staff, endpoint):
    client.force_login(staff)
    assert "Could not reach" in client.post(f"/endpoints/{endpoint.pk}/test").content.decode()


def test_staff_moves_the_default_to_another_endpoint(client, endpoint, staff):
    client.force_login(staff)
    form = {"name": "vLLM", "base_url": "http://127.0.0.1:9/v1", "concurrency": 50, "make_default": "on"}
    response = client.post("/endpoints/new/", form)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Endpoint.objects.get(is_default=True).name == "vLLM"
    assert not Endpoint.objects.get(pk=endpoint.pk).is_default
    page = client.get(f"/endpoints/{endpoint.pk}/").content.decode()
    assert "Requests per minute" in page and "Base URL" in page
    client.post(
        f"/endpoints/{endpoint.pk}/",
        {"name": endpoint.name, "base_url": endpoint.base_url, "concurrency": 5, "make_default": "on"},
    )
    assert Endpoint.objects.get(is_default=True).pk == endpoint.pk


def test_pages_do_not_write_the_env_endpoint_again(client, owner, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-123456")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    first = Endpoint.default()
    assert first.from_env and first.api_key == "sk-from-env-123456"
    updated = first.updated_at
    with CaptureQueriesContext(connection) as queries:
        assert Endpoint.default().pk == first.pk
    assert not [q for q in queries if q["sql"].lstrip().upper().startswith(("UPDATE", "INSERT"))]
    assert Endpoint.objects.get(pk=first.pk).updated_at == updated
    monkeypatch.setenv("OPENAI_CONCURRENCY", "7")
    assert Endpoint.default().concurrency == 7  # a real change is still written


def test_env_endpoint_survives_a_changed_secret_key(client, owner, monkeypatch, settings):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-123456")
    Endpoint.default()
    settings.SECRET_KEY = "another-secret-key-" + "x" * 40
    endpoint = Endpoint.default()  # the stored key cannot be decrypted: the environment's replaces it
    assert endpoint.api_key == "sk-from-env-123456"


def test_endpoint_test_connection_against_the_simulator(client, staff):
    from simulator import SimConfig, serve_in_thread

    client.force_login(staff)
    with serve_in_thread(SimConfig(api_key="sk-right-key-123456")) as base:
        good = make_endpoint(base)
        good.set_api_key("sk-right-key-123456")
        good.save()
        text = client.post(f"/endpoints/{good.pk}/test").content.decode()
        assert "Connected in" in text and "Its Batch API answers" in text
        good.set_api_key("sk-wrong-key-000000")
        good.save()
        assert "refused the API key" in client.post(f"/endpoints/{good.pk}/test").content.decode()
    with serve_in_thread(SimConfig(batch_api=False)) as base:  # as llama.cpp, vLLM or Ollama
        bare = Endpoint.objects.create(name="llama.cpp", base_url=base)
        text = client.post(f"/endpoints/{bare.pk}/test").content.decode()
        assert "Connected in" in text and "no Batch API (HTTP 404)" in text and "flash-success" in text


def test_usage_page(client, owner, teammate, endpoint, write):
    a = make_job(write, owner, endpoint, 2, start=False)
    b = make_job(write, teammate, endpoint, 2, start=False)
    Job.objects.filter(pk=a.pk).update(prompt_tokens=1000, completion_tokens=500, cost="0.5")
    Job.objects.filter(pk=b.pk).update(prompt_tokens=10, completion_tokens=5, cost="0.01")
    client.force_login(teammate)
    page = client.get("/usage/").content.decode()
    assert "1,500" in page and "$0.5000" in page and "teammate" in page and "gpt-4o-mini" in page
    assert page.count("<rect ") == 30  # a bar per day of the last 30
    assert "1,515 tokens, $0.5100, 2 jobs</title>" in page  # today's bar


def test_progress_partial_stops_polling_when_finished(client, owner, endpoint, write):
    job = make_job(write, owner, endpoint, 2, start=False)
    Job.objects.filter(pk=job.pk).update(name="<b>Q&A</b>")
    Item.objects.filter(pk=job.items.first().pk).update(status=Item.Status.SUCCEEDED)
    ledger.recount(job)
    client.force_login(owner)
    response = client.get(f"/jobs/{job.pk}/progress", HTTP_HX_REQUEST="true")
    # The tab's title follows the progress (htmx takes it from the partial), escaped like the rest
    assert (
        response.status_code == 200
        and "<title>50% · &lt;b&gt;Q&amp;A&lt;/b&gt; · Batchsite</title>" in response.content.decode()
    )
    assert (
        "<title>50% · &lt;b&gt;Q&amp;A&lt;/b&gt; · Batchsite</title>" in client.get(f"/jobs/{job.pk}/").content.decode()
    )
    assert (
        "· Batchsite</title>" not in client.get(f"/jobs/{job.pk}/progress").content.decode()
    )  # not htmx: no page title
    control.cancel(job)
    response = client.get(f"/jobs/{job.pk}/progress", HTTP_HX_REQUEST="true")
    page = response.content.decode()
    assert response.status_code == 286 and "<title>Cancelled · &lt;b&gt;" in page
    # Cancelled items are not progress: the job stopped half-way, and says so
    assert ">50%<" in page and "1 of 2 done · 1 cancelled" in page and 'class="cancelled" style="width: 50.0%"' in page
    assert "1 / 2" in client.get("/").content.decode()


@pytest.mark.parametrize(
    "url",
    [
        "/?page=abc&status=<x>&scope=zzz",
        "/?page=999999",
        "/jobs/{job}/items/?page=-1&status=nope",
        "/jobs/new/nonexistent/",
        "/jobs/{job}/items/99999999/",
        "/jobs/new/",
    ],
)
def test_odd_urls_are_not_server_errors(client, owner, endpoint, write, url):
    job = make_job(write, owner, endpoint, 2, start=False)
    client.force_login(owner)
    assert client.get(url.format(job=job.pk)).status_code in (200, 302, 404)


def test_upload_without_a_file_shows_the_form_again(client, owner):
    client.force_login(owner)
    assert client.post("/jobs/new/", {}).status_code == 200


def test_upload_of_a_binary_file_goes_on_to_review(client, owner):
    client.force_login(owner)
    assert client.post("/jobs/new/", {"file": SimpleUploadedFile("x.bin", b"\x00\xff\xfe")}).status_code == 302


@pytest.mark.parametrize("url", ["/?q=a%00b", "/?model=%00", "/jobs/{job}/items/?q=%00"])
def test_nul_characters_are_turned_away_at_the_door(client, owner, endpoint, write, url):
    """Postgres refuses NUL characters in queries."""
    job = make_job(write, owner, endpoint, 2, start=False)
    client.force_login(owner)
    assert client.get(url.format(job=job.pk)).status_code == 400


def test_a_nul_character_in_a_v1_path_is_an_openai_error(client):
    response = client.get("/v1/batches/batch_%00", HTTP_AUTHORIZATION="Bearer x")
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_revoking_an_unknown_token_is_404(client, owner):
    client.force_login(owner)
    assert client.post("/account/tokens/", {"action": "revoke", "token": "²"}).status_code == 404


def test_review_of_an_upload_gone_from_disk_asks_for_it_again(client, owner, endpoint):
    import shutil

    from django.conf import settings

    client.force_login(owner)
    url = upload(client, "a.jsonl", jsonl([chat_line("a")]))
    path = settings.DATA_DIR / client.session["uploads"][url.rstrip("/").split("/")[-1]]["file"]
    shutil.rmtree(path.parent)
    response = client.get(url, follow=True)
    assert "no longer on the server" in response.content.decode()
    assert response.redirect_chain[-1][0] == "/jobs/new/"


def test_pages_are_fast_and_queries_bounded_on_big_data(client, owner, endpoint, write):
    big = make_job(write, owner, endpoint, 50_000, start=False)
    Job.objects.bulk_create(
        [
            Job(
                owner=owner,
                name=f"job {i}",
                url="/v1/chat/completions",
                model="gpt-4o-mini",
                total=10,
                n_succeeded=10,
                status=Job.Status.COMPLETED,
            )
            for i in range(1000)
        ]
    )
    Item.objects.filter(job=big, line__lte=500).update(
        status=Item.Status.FAILED, error_code="http_500", http_status=500
    )
    ledger.recount(big)
    start = timezone.now() - timedelta(days=1)  # a day-long run's timeline for the chart
    JobTick.objects.bulk_create(
        [
            JobTick(
                job=big,
                at=start + timedelta(seconds=10 * i),
                succeeded=3,
                failed=int(i % 500 == 0),
                retried=2 * int(i % 300 == 0),
            )
            for i in range(8640)
        ]
    )
    client.force_login(owner)
    urls = [
        "/",
        "/?scope=mine&status=completed&q=job",
        f"/jobs/{big.pk}/",
        f"/jobs/{big.pk}/progress",
        f"/jobs/{big.pk}/items/",
        f"/jobs/{big.pk}/items/?status=failed&page=5",
        f"/jobs/{big.pk}/items/?page=900",
        "/usage/",
        f"/jobs/{big.pk}/items/{big.items.order_by('-line').values_list('pk', flat=True).first()}/",
        "/?page=40",
        "/account/tokens/",
    ]
    for url in urls:
        client.get(url)  # warm caches (templates, sessions)
        with CaptureQueriesContext(connection) as queries:
            start, cpu = time.perf_counter(), time.thread_time()
            response = client.get(url)
            elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
        assert response.status_code == 200, url
        assert len(queries) <= 12, (url, [q["sql"] for q in queries])
        # < 100 ms is the target (bench/pages.py prints it). This thread's CPU is what the page costs whatever
        # else the machine runs (the suite's passes share two cores); the wall-clock bound catches slow queries.
        assert cpu < 0.25 and elapsed < 1.0, (url, cpu, elapsed)
    page = client.get(f"/jobs/{big.pk}/").content.decode()
    assert page.count('class="b"') == 60 and "(1 d)" in page  # the whole day-long run, in 24-minute bars
    assert (
        page.count('class="f"') == 18 and page.count("<polyline ") == 1
    )  # failed stacked on top; retries drawn as a line


def test_endpoint_form_offers_to_keep_a_key_only_when_there_is_one(client, endpoint, staff):
    client.force_login(staff)
    keyless = Endpoint.objects.create(name="ollama", base_url="http://127.0.0.1:9/v1")
    for url in ("/endpoints/new/", f"/endpoints/{keyless.pk}/"):
        page = client.get(url).content.decode()
        assert "keep the stored key" not in page and "Stored key" not in page, url
        assert "x-ratelimit-* headers" in page, url
    page = client.get(f"/endpoints/{endpoint.pk}/").content.decode()
    assert 'Stored key: <span class="mono">…-key</span>. Leave empty to keep the stored key.' in page


def test_not_found_page_speaks_plainly(client, owner):
    client.force_login(owner)
    response = client.get("/jobs/999999/")
    page = response.content.decode()
    assert response.status_code == 404
    assert "This page does not exist, or it was deleted." in page and "matches the given query" not in page


def test_a_big_file_launches_at_once_and_a_worker_adds_its_requests_with_progress(
    client, owner, endpoint, settings, monkeypatch, django_capture_on_commit_callbacks
):
    """Above BATCHSITE_INLINE_VALIDATION_BYTES, Launch answers without reading the file: the job is
    `validating`, and the worker's check (run here as the task would) renders the CSV template, shows how
    far it has got, creates the items and starts the job."""
    from jobs import ingest
    from jobs.ingest import plan as plan_module
    from jobs.ingest import validating

    settings.BATCHSITE_INLINE_VALIDATION_BYTES = 100
    rows = "".join(f"T{i},Ticket number {i}\n" for i in range(300))
    client.force_login(owner)
    url = upload(client, "tickets.csv", f"id,ticket\n{rows}".encode())
    form = {
        "name": "Tickets",
        "endpoint": endpoint.pk,
        "max_attempts": 3,
        "url": "/v1/chat/completions",
        "model": "gpt-4o-mini",
        "user_prompt": "Classify: {{ ticket }}",
        "custom_id_column": "id",
        "mode": "live",
        "action": "check",
    }
    assert "Waiting for a worker to check the file" in client.post(url, form).content.decode()
    assert run_queued_checks() == 1  # the CSV template's check, by a worker
    assert "All 300 requests are valid" in client.get(f"{url}check", HTTP_HX_REQUEST="true").content.decode()

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(url, {**form, "action": "launch"})
    job = Job.objects.get()
    assert response.status_code == 302 and response.url == f"/jobs/{job.pk}/"
    assert (job.status, job.items.count(), job.max_attempts, job.url) == (
        Job.Status.VALIDATING,
        0,
        3,
        "/v1/chat/completions",
    )
    assert len(callbacks) == 1  # the check is enqueued once the job is committed
    page = client.get(f"/jobs/{job.pk}/progress", HTTP_HX_REQUEST="true").content.decode()
    assert "Waiting for a worker to check the file" in page

    seen, seen_on_page = [], []
    show = validating._show_progress
    monkeypatch.setattr(plan_module, "PROGRESS_EVERY", 50)
    monkeypatch.setattr("jobs.ingest.create.CHUNK", 100)

    def look(job_id, f):
        seen.append(f)
        show(job_id, f)
        # The page while the file is read (the first half). Not while the items go in: on Postgres that is a
        # COPY on this very connection, which a page served in this thread would wait on for ever.
        if 0 < f < 0.5:
            seen_on_page.append(client.get(f"/jobs/{job.pk}/progress").content.decode())

    monkeypatch.setattr(validating, "_show_progress", look)
    ingest.validate_job(job.pk)

    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED and job.total == 300 and job.columns == ["id", "ticket"]
    assert json.loads(job.items.get(custom_id="T7").body)["messages"][-1]["content"] == "Classify: Ticket number 7"
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 1.0 and len(seen) >= 6
    assert any(
        "Checking the file and adding its requests" in p and re.search(r'class="percent">([1-9]\d?)%<', p)
        for p in seen_on_page
    )
    assert ingest.validation_progress(job.pk) is None  # done: the job page shows its requests now


def test_a_big_file_that_fails_its_check_at_launch_fails_the_job_with_its_lines(client, owner, endpoint, settings):
    from jobs import ingest

    settings.BATCHSITE_INLINE_VALIDATION_BYTES = 10
    client.force_login(owner)
    good = jsonl([chat_line(f"r{i}") for i in range(5)])
    url = upload(client, "calls.jsonl", good)
    client.get(url)
    assert run_queued_checks() == 1
    assert "All 5 requests are valid" in client.get(url).content.decode()
    token = url.rstrip("/").split("/")[-1]
    from django.conf import settings as live

    path = live.DATA_DIR / client.session["uploads"][token]["file"]
    path.write_bytes(good + b'{"custom_id": "broken",\n')  # changed on disk after the review
    client.post(url, {"name": "", "endpoint": endpoint.pk, "max_attempts": 5, "action": "launch", "mode": "live"})
    job = Job.objects.get()
    ingest.validate_job(job.pk)

    job.refresh_from_db()
    assert job.status == Job.Status.FAILED and job.items.count() == 0
    assert [e["line"] for e in job.errors] == [6]
    assert "Line" in client.get(f"/jobs/{job.pk}/").content.decode()


QUEUED_CHECKS: list[tuple] = []


@pytest.fixture(autouse=True)
def queued_checks(monkeypatch):
    """The review checks the pages enqueue, kept here (whichever broker the settings name: the ORM's table, or
    Redis) for run_queued_checks to run as a worker would."""
    from jobs import queue

    real = queue.async_task

    def enqueue(func, *args, **kwargs):
        if func != queue.CHECK_UPLOAD:
            return real(func, *args, **kwargs)
        QUEUED_CHECKS.append(args)

    QUEUED_CHECKS.clear()
    monkeypatch.setattr(queue, "async_task", enqueue)
    yield
    QUEUED_CHECKS.clear()


def run_queued_checks() -> int:
    """The review checks waiting in the queue, run here as a worker runs them."""
    from jobs.ingest import validating

    ran = 0
    while QUEUED_CHECKS:
        validating.check_upload(*QUEUED_CHECKS.pop(0))
        ran += 1
    return ran


def test_a_big_jsonl_is_checked_by_a_worker_while_the_review_page_polls_its_progress(
    client, owner, endpoint, settings, monkeypatch
):
    """Above BATCHSITE_INLINE_VALIDATION_BYTES the review page answers without reading the file: a worker
    checks it, the page polls how far it has got, then shows the line-numbered errors; later visits are instant."""
    from jobs.ingest import plan as plan_module
    from jobs.ingest import validating

    settings.BATCHSITE_INLINE_VALIDATION_BYTES = 100
    lines = [chat_line(f"r{i}") for i in range(300)]
    content = jsonl(lines[:150]) + b'{"custom_id": "broken",\n' + jsonl(lines[150:]) + jsonl([chat_line("r7")])
    client.force_login(owner)
    url = upload(client, "calls.jsonl", content)

    def not_here(*args, **kwargs):
        raise AssertionError("the file was read in the request")

    with monkeypatch.context() as m:
        m.setattr(plan_module, "validate", not_here)
        page = client.get(url).content.decode()
        assert client.get(url).status_code == 200  # a second look enqueues nothing more
        waiting = client.get(f"{url}check", HTTP_HX_REQUEST="true")
    assert "Waiting for a worker to check the file" in page and f'hx-get="{url}check"' in page
    assert 'hx-trigger="every 1s"' in page and 'table class="table errors' not in page
    assert re.search(r'value="launch"[^>]*disabled', page)  # nothing to launch before the check
    assert waiting.status_code == 200 and "Waiting for a worker" in waiting.content.decode()

    seen = []
    checked = validating.checked

    def checked_and_looked(*args, progress, **kwargs):
        def look(n):
            progress(n)
            seen.append(client.get(f"{url}check", HTTP_HX_REQUEST="true").content.decode())

        return checked(*args, progress=look, **kwargs)

    monkeypatch.setattr(plan_module, "PROGRESS_EVERY", 100)
    monkeypatch.setattr(validating, "checked", checked_and_looked)
    assert run_queued_checks() == 1  # once, however many looked
    assert len(seen) == 3  # at 100, 200 and 300 requests
    assert (
        'Checking the file… <strong class="lines">100</strong> of 302 lines' in seen[0]
        and '(<strong class="percent">33%' in seen[0]
    )
    assert 'hx-trigger="every 1s"' in seen[1]

    done = client.get(f"{url}check", HTTP_HX_REQUEST="true")
    result = done.content.decode()
    assert done.status_code == 286  # htmx stops polling
    assert "2 problems" in result and "hx-get" not in result.split("</div>")[0]
    rows = re.findall(r'<td class="num">(\d+)</td><td>([^<]*)</td>', result)
    assert [line for line, _ in rows] == ["151", "302"] and "already used on line 8" in rows[1][1]
    assert re.search(r'id="review-actions" hx-swap-oob="true">.*value="launch"[^>]*disabled', result, re.S)

    with monkeypatch.context() as m:
        m.setattr(plan_module, "validate", not_here)
        page = client.get(url).content.decode()  # remembered next to the upload
    assert "2 problems" in page and "Checking the file" not in page and run_queued_checks() == 0


def test_a_check_the_worker_cannot_finish_shows_an_error_not_a_spinner(client, owner, endpoint, settings, monkeypatch):
    from jobs.ingest import plan as plan_module

    settings.BATCHSITE_INLINE_VALIDATION_BYTES = 100
    client.force_login(owner)
    url = upload(client, "calls.jsonl", jsonl([chat_line(f"r{i}") for i in range(20)]))
    client.get(url)

    def crash(*args, **kwargs):
        raise RuntimeError("the worker ran out of memory")

    monkeypatch.setattr(plan_module, "jsonl_requests", crash)
    assert run_queued_checks() == 1
    response = client.get(f"{url}check", HTTP_HX_REQUEST="true")
    page = response.content.decode()
    assert response.status_code == 286 and "The file could not be checked" in page and "RuntimeError" in page
    assert "out of memory" not in page  # the worker's log has the details, not the page
    page = client.get(url).content.decode()
    assert "The file could not be checked" in page and 'hx-trigger="every 1s"' not in page


def test_only_the_uploader_can_poll_the_check_of_an_upload(client, owner, teammate, endpoint, settings):
    settings.BATCHSITE_INLINE_VALIDATION_BYTES = 100
    client.force_login(owner)
    url = upload(client, "calls.jsonl", jsonl([chat_line(f"r{i}") for i in range(20)]))
    assert "Waiting for a worker" in client.get(url).content.decode()
    assert client.get(f"{url}check").status_code == 200

    client.force_login(teammate)
    assert client.get(f"{url}check").status_code == 404
    assert client.get(url).status_code == 302  # the review itself sends them to upload their own
    client.logout()
    response = client.get(f"{url}check")
    assert response.status_code == 302 and "/login/" in response.url
