"""The dashboard in a real headless Chromium (Playwright), against a live server, a real qcluster
and the simulator. Screenshots land in test-artifacts/ (the README's come from `make screenshots`)."""

import json
import os
import re
from pathlib import Path

import pytest

from jobs.models import Endpoint, Item, Job
from tests.factories import chat_line, make_endpoint, make_job, seed_prices

# Playwright's sync API runs an event loop in this thread; the ORM calls in these tests are ours.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not Path("/usr/bin/chromium").exists(), reason="needs /usr/bin/chromium (make test installs it)"
    ),
]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {
        **browser_type_launch_args,
        "executable_path": "/usr/bin/chromium",
        "args": [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1360, "height": 900}, "accept_downloads": True}


def watch_csp(context, seen: list) -> None:
    """Collect every Content Security Policy violation in `context`'s pages: Chromium's console message and
    the page's own securitypolicyviolation event (the init script runs outside the page's policy)."""
    context.on(
        "console", lambda message: seen.append(message.text) if "Content Security Policy" in message.text else None
    )
    context.add_init_script(
        "document.addEventListener('securitypolicyviolation', (e) => "
        "console.error(`Content Security Policy violation: ${e.violatedDirective} ${e.blockedURI}`))"
    )


@pytest.fixture(autouse=True)
def csp_violations(request):
    """Every browser test also checks that the pages it visited broke no rule of the Content Security Policy."""
    seen: list = []
    if "page" in request.fixturenames:
        watch_csp(request.getfixturevalue("page").context, seen)
    yield seen
    assert not seen, seen


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page, live_server, username: str, password: str):
    page.goto(f"{live_server.url}/")
    assert "/login/" in page.url
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")


@pytest.fixture
def users(django_user_model):
    seed_prices()
    owner = django_user_model.objects.create_user("alice", password="alice-pass-123")
    teammate = django_user_model.objects.create_user("bob", password="bob-pass-123")
    return owner, teammate


def test_bad_file_shows_line_numbered_errors(page, live_server, users, tmp_path):
    make_endpoint("http://127.0.0.1:9/v1")
    sign_in(page, live_server, "alice", "alice-pass-123")
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps(chat_line("a")) + "\n{oops\n" + json.dumps(chat_line("a")) + "\n")
    page.goto(f"{live_server.url}/jobs/new/")
    page.set_input_files("#id_file", str(bad))
    page.click("text=Upload and check")
    page.wait_for_selector("table.errors")
    rows = page.locator("table.errors tbody tr").all_inner_texts()
    assert rows[0].startswith("2\t") and "not valid JSON" in rows[0]
    assert rows[1].startswith("3\t") and "already used on line 1" in rows[1]
    assert page.locator("button[value=launch]").is_disabled()
    shot(page, "upload-errors")
    assert Job.objects.count() == 0


def test_upload_launch_and_watch_to_completion_then_download(
    page, live_server, users, tmp_path, cluster, simulator, settings
):
    settings.BATCHSITE_INLINE_VALIDATION_BYTES = 1000  # the JSONL launches off the request path, the CSV inline
    sim = simulator("--latency-ms", "30")
    make_endpoint(sim.base_url)
    cluster()
    sign_in(page, live_server, "alice", "alice-pass-123")

    # A JSONL: preview and estimate, then launch.
    good = tmp_path / "questions.jsonl"
    text = lambda i: f"Question number {i}" + (" SIMULATE_400" if i % 50 == 7 else "")  # noqa: E731
    good.write_text("".join(json.dumps(chat_line(f"q{i}", text(i))) + "\n" for i in range(400)))
    page.goto(f"{live_server.url}/jobs/new/")
    page.set_input_files("#id_file", str(good))
    page.click("text=Upload and check")
    page.wait_for_selector("text=All 400 requests are valid")
    assert "Question number 0" in page.locator("pre.code").first.inner_text()
    assert page.locator("text=Input tokens (est.)").count() == 1
    shot(page, "review-jsonl")
    page.click("button[value=launch]")
    page.wait_for_url(re.compile(r"/jobs/\d+/$"))
    assert page.locator("text=a worker is checking the file").count() == 1
    # Progress reaches 100% by htmx polling alone: no reload.
    page.evaluate("window.__marker = 'same page'")
    page.wait_for_selector("#progress [data-status=completed]", timeout=120_000)
    assert page.evaluate("window.__marker") == "same page"
    assert page.locator(".percent").inner_text() == "100%"
    assert page.title() == "Completed · questions · Batchsite"  # the tab's title followed the polling
    shot(page, "job-detail")

    with page.expect_download() as download:
        page.click("text=Results JSONL")
    lines = Path(download.value.path()).read_text().splitlines()
    answers = {
        json.loads(line)["custom_id"]: json.loads(line)["response"]["body"]["choices"][0]["message"]["content"]
        for line in lines
    }
    assert answers == {f"q{i}": f"Echo: Question number {i}" for i in range(400) if i % 50 != 7}
    errors = page.locator("table.errors-by-kind tbody tr").all_inner_texts()
    assert len(errors) == 1 and errors[0].startswith("HTTP 400") and "\t8\t" in errors[0]

    # A CSV with a template chosen from the presets and edited.
    rows = tmp_path / "reviews.csv"
    rows.write_text('review_id,review\nr1,"Loved it, truly"\nr2,Broke in a day\n')
    page.goto(f"{live_server.url}/jobs/new/")
    page.set_input_files("#id_file", str(rows))
    page.click("text=Upload and check")
    # A preset sets every template field: one without a schema clears the last one's.
    page.click("button[data-preset]:has-text('Extract to JSON')")
    assert '"invoice_number"' in page.input_value("#id_json_schema")
    page.click("button[data-preset]:has-text('Summarise')")
    assert page.input_value("#id_json_schema") == "" and "Summarise" in page.input_value("#id_user_prompt")
    page.click("button[data-preset]:has-text('Sentiment')")
    page.fill("#id_user_prompt", "")
    page.click("#id_user_prompt")
    page.click("button[data-insert=review]")
    assert page.input_value("#id_user_prompt") == "{{ review }}"
    page.select_option("#id_custom_id_column", "review_id")
    page.click("button[value=check]")
    page.wait_for_selector("text=All 2 requests are valid")
    assert "Loved it, truly" in page.locator("pre.code").first.inner_text()
    estimate = page.locator("#check dl.counts").inner_text()
    assert re.search(r"Input tokens \(est\.\)\s+\d+", estimate) and re.search(
        r"Input cost \(est\.\)\s+\$0\.\d{4}", estimate
    )
    shot(page, "review-csv")
    page.click("button[value=launch]")
    page.wait_for_selector("#progress [data-status=completed]", timeout=60_000)
    with page.expect_download() as download:
        page.click("text=CSV (your rows + answers)")
    text = Path(download.value.path()).read_text()
    assert text.splitlines()[0].startswith("review_id,review,output,sentiment,confidence")
    assert 'r1,"Loved it, truly"' in text


def test_cancel_a_running_job_and_teammate_cannot(
    page, live_server, users, cluster, simulator, write, browser, csp_violations
):
    owner, teammate = users
    sim = simulator("--latency-ms", "300")
    endpoint = make_endpoint(sim.base_url, concurrency=4)
    cluster()
    job = make_job(write, owner, endpoint, 300)

    other = browser.new_context()
    watch_csp(other, csp_violations)
    bob = other.new_page()
    sign_in(bob, live_server, "bob", "bob-pass-123")
    bob.goto(f"{live_server.url}/jobs/{job.pk}/")
    assert bob.locator("button:has-text('Cancel job')").count() == 0
    assert "Only alice or staff" in bob.inner_text("#progress")
    # Even a forged request is refused.
    status = bob.evaluate(
        """async (url) => (await fetch(url, {method: 'POST', headers: {'X-CSRFToken': document.cookie.match(/csrftoken=([^;]+)/)[1]}})).status""",
        f"{live_server.url}/jobs/{job.pk}/cancel",
    )
    assert status == 403
    other.close()

    sign_in(page, live_server, "alice", "alice-pass-123")
    page.goto(f"{live_server.url}/jobs/{job.pk}/")
    page.wait_for_selector("#progress [data-status=running]", timeout=60_000)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("button:has-text('Cancel job')")
    page.wait_for_selector("#progress [data-status=cancelled]", timeout=60_000)
    job.refresh_from_db()
    assert job.status == Job.Status.CANCELLED and job.n_cancelled > 0
    assert job.n_succeeded + job.n_cancelled == 300


def test_xss_in_a_model_answer_is_shown_as_text(page, live_server, users, write):
    owner, _ = users
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 1, start=False)
    payload = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    body = {
        "choices": [{"message": {"role": "assistant", "content": payload}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    Item.objects.filter(job=job).update(
        status=Item.Status.SUCCEEDED, http_status=200, response=json.dumps(body), custom_id=payload
    )
    item = job.items.get()
    sign_in(page, live_server, "alice", "alice-pass-123")
    for url in (f"/jobs/{job.pk}/items/{item.pk}/", f"/jobs/{job.pk}/items/"):
        page.goto(live_server.url + url)
        assert page.evaluate("window.__pwned") is None
        assert payload in page.inner_text("main")


def test_pages_fit_a_narrow_window(page, live_server, users, write, django_user_model):
    owner, _ = users
    django_user_model.objects.filter(pk=owner.pk).update(is_staff=True)
    job = make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 30, start=False)
    sign_in(page, live_server, "alice", "alice-pass-123")
    Endpoint.objects.create(
        name="Azure, team deployment for the nightly batches",
        rpm=10_000_000,
        tpm=150_000_000,
        base_url="https://my-resource-name.openai.azure.com/openai/deployments/gpt-4o-mini-batch/v1",
    )
    for width in (700, 900, 1100):
        page.set_viewport_size({"width": width, "height": 900})
        for url in (
            "/",
            f"/jobs/{job.pk}/",
            f"/jobs/{job.pk}/items/",
            "/usage/",
            "/endpoints/",
            "/team/",
            "/account/tokens/",
        ):
            page.goto(live_server.url + url)
            # Wide tables scroll inside their box; the page itself never scrolls sideways.
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (width, url)
    shot(page, "narrow-tokens")


def test_csp_stops_injected_inline_script_and_the_admin_keeps_working(
    page, live_server, users, django_user_model, csp_violations
):
    django_user_model.objects.create_superuser("root", password="root-pass-123")
    make_endpoint("http://127.0.0.1:9/v1")
    sign_in(page, live_server, "root", "root-pass-123")
    # Markup that slipped past escaping would still not run: inline handlers and scripts are refused.
    page.evaluate("""document.body.insertAdjacentHTML('beforeend', '<img src="/static/none.png" onerror="window.__ran = 1">');
                     const s = document.createElement('script'); s.textContent = 'window.__ran = 2'; document.body.append(s);""")
    page.wait_for_function("document.querySelector('img[onerror]') !== null")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__ran") is None
    assert any("inline" in text or "script-src" in text for text in csp_violations), csp_violations
    csp_violations.clear()  # the rest must run without any violation
    for url in (
        "/admin/",
        "/admin/jobs/job/",
        "/admin/jobs/endpoint/1/change/",
        "/admin/auth/user/add/",
        "/admin/axes/accessattempt/",
    ):
        page.goto(live_server.url + url)
        assert page.locator("#content").count() == 1, url
    page.goto(f"{live_server.url}/?scope=all")
    page.check("input[name=scope][value=mine]")  # filters submit themselves, from static JS
    page.wait_for_url(re.compile(r"scope=mine"))


def hybrid_timeline(job) -> str:
    """When a hybrid job misses its deadline: where the time went, in seconds before the deadline."""
    from django.db.models import Max, Min

    def t(moment):
        return None if moment is None else round((job.deadline - moment).total_seconds(), 2)

    items = job.items.filter(latency_ms__isnull=False).aggregate(first=Min("finished_at"), last=Max("finished_at"))
    chunks = [(c.status, t(c.cancel_requested_at), t(c.collected_at)) for c in job.remote_batches.all()]
    return (
        f"seconds before the deadline: switch planned {t(job.switch_at)}, switched {t(job.switched_at)}, "
        f"chunks (status, cancel asked, collected) {chunks}, slice enqueued {t(job.slice_enqueued_at)} "
        f"picked {t(job.slice_picked_at)}, live items {t(items['first'])}..{t(items['last'])}, "
        f"finished {t(job.finished_at)}; {job.switch_note}"
    )


def test_a_hybrid_job_from_the_form_shows_its_batches_and_switch_then_completes(
    page, live_server, users, tmp_path, cluster, simulator
):
    from datetime import timedelta

    from django.utils import timezone

    sim = simulator("--batch-seconds", "120", "--latency-ms", "20")
    make_endpoint(sim.base_url, rpm=6000, batch_cancel_seconds=2)
    cluster(BATCHSITE_REMOTE_POLL_SECONDS="1", BATCHSITE_HYBRID_MARGIN_SECONDS="2")
    sign_in(page, live_server, "alice", "alice-pass-123")
    path = tmp_path / "nightly.jsonl"
    path.write_text("".join(json.dumps(chat_line(f"q{i}", f"Question {i}")) + "\n" for i in range(80)))
    page.goto(f"{live_server.url}/jobs/new/")
    page.set_input_files("#id_file", str(path))
    page.click("text=Upload and check")
    page.wait_for_selector("text=All 80 requests are valid")
    assert page.locator(".estimate-modes").inner_text().startswith("Batch API: 50% off the live price")
    assert page.locator(".hybrid-earliest").count() == 1

    page.select_option("#id_mode", "hybrid")
    deadline = timezone.localtime(timezone.now() + timedelta(seconds=100))  # the form reads TIME_ZONE
    page.fill("#id_deadline", deadline.strftime("%Y-%m-%dT%H:%M"))  # whole minutes: 40 to 100 s away
    page.click("button[value=launch]")
    page.wait_for_url(re.compile(r"/jobs/\d+/$"))
    page.wait_for_selector("text=Batches at the Batch API", timeout=30_000)
    assert "Switches to live at" in page.locator(".hybrid-plan").inner_text()
    shot(page, "hybrid-job")
    page.wait_for_selector("#progress [data-status=completed]", timeout=120_000)

    job = Job.objects.get()
    assert (job.mode, job.n_succeeded, job.n_failed) == (Job.Mode.HYBRID, 80, 0), job.counts()
    assert job.finished_at <= job.deadline, hybrid_timeline(job)
    assert "Switched to live at" in page.locator(".hybrid-plan").inner_text()
    assert "cancelled" in page.locator("table.chunks").inner_text()
    assert sim.stats()["by_path"].get("/v1/chat/completions", 0) == job.items.filter(latency_ms__isnull=False).count()


def test_a_big_file_is_checked_by_a_worker_while_the_review_page_shows_progress(
    page, live_server, users, tmp_path, cluster, settings
):
    """Above BATCHSITE_INLINE_VALIDATION_BYTES the review page answers at once and a worker checks the file:
    the page shows how far it has got, then the errors with their lines, by htmx polling alone."""
    settings.BATCHSITE_INLINE_VALIDATION_BYTES = 1000
    make_endpoint("http://127.0.0.1:9/v1")
    cluster()
    sign_in(page, live_server, "alice", "alice-pass-123")
    big = tmp_path / "big.jsonl"
    lines = [json.dumps(chat_line(f"q{i}", f"Question number {i}")) for i in range(150_000)]
    lines[99_999] = '{"custom_id": "broken",'  # line 100,000
    big.write_text("\n".join(lines) + "\n")
    page.goto(f"{live_server.url}/jobs/new/")
    page.set_input_files("#id_file", str(big))
    page.click("text=Upload and check")
    page.wait_for_url(re.compile(r"/jobs/new/\w+/$"))
    page.evaluate("window.__marker = 'same page'")
    page.wait_for_selector("#check .checking:has-text('Checking the file…')", timeout=60_000)
    assert page.locator("button[value=launch]").is_disabled()
    shot(page, "review-checking")
    page.wait_for_selector("table.errors", timeout=120_000)
    assert page.evaluate("window.__marker") == "same page"
    rows = page.locator("table.errors tbody tr").all_inner_texts()
    assert len(rows) == 1 and rows[0].startswith("100000\t") and "not valid JSON" in rows[0], rows
    assert page.locator("button[value=launch]").is_disabled()
    assert page.locator("#check[hx-get]").count() == 0  # polling stopped
    assert Job.objects.count() == 0
