"""The answer cache (issue 14): jobs with use_cache reuse answers given before to identical requests, and
send a request repeated inside a job once. A real qcluster against the simulator, whose count of requests
says what was really sent."""

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from jobs.engine import answercache
from jobs.engine.leases import Claimed
from jobs.models import CachedAnswer, Item, Job, cache_key
from tests.factories import make_endpoint, make_job
from tests.test_engine_cluster import wait_status

CHAT = "/v1/chat/completions"


SERVER = "http://127.0.0.1:9/v1"


def test_the_key_ignores_key_order_and_spacing_but_not_the_endpoint_or_its_server():
    a = cache_key(1, SERVER, CHAT, '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    b = cache_key(1, SERVER, CHAT, '{"messages":[{"content":"hi","role":"user"}],"model":"m"}')
    assert a == b
    assert cache_key(2, SERVER, CHAT, '{"model":"m","messages":[{"role":"user","content":"hi"}]}') != a
    assert cache_key(1, SERVER, CHAT, '{"model":"m","messages":[{"role":"user","content":"hi!"}]}') != a
    assert (
        cache_key(1, "http://127.0.0.1:10/v1", CHAT, '{"model":"m","messages":[{"role":"user","content":"hi"}]}') != a
    )


@pytest.mark.django_db
def test_an_endpoint_moved_to_another_server_does_not_get_the_old_servers_answers(write, owner):
    endpoint = make_endpoint(SERVER)
    job = make_job(write, owner, endpoint, 1, start=False)
    item = job.items.get()
    claimed = Claimed(item.id, item.custom_id, item.body, item.est_tokens, item.attempts)
    CachedAnswer.objects.create(
        key=cache_key(endpoint.pk, SERVER, CHAT, item.body),
        endpoint=endpoint,
        url=CHAT,
        response='{"old":1}',
        answered_at=timezone.now(),
    )
    send, others = answercache.sort_out(endpoint.pk, endpoint.base_url, CHAT, uuid.uuid4(), [claimed])
    assert send == [] and others[0].from_cache  # the same server: answered from the cache

    endpoint.base_url = "http://127.0.0.1:10/v1"
    endpoint.save(update_fields=["base_url"])
    send, others = answercache.sort_out(endpoint.pk, endpoint.base_url, CHAT, uuid.uuid4(), [claimed])
    assert [c.id for c in send] == [item.id] and others == []  # sent to the new server


def sent(sim) -> int:
    return sim.stats()["by_path"].get(CHAT, 0)


def run(write, owner, endpoint, n, text, use_cache=True) -> Job:
    job = make_job(write, owner, endpoint, n, text=text, start=False)
    Job.objects.filter(pk=job.pk).update(use_cache=use_cache)
    job.refresh_from_db()
    job.start()
    return wait_status(job, Job.Status.COMPLETED, 120)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_duplicates_go_once_and_a_second_identical_job_is_answered_from_the_cache(
    cluster, simulator, write, owner, settings
):
    sim = simulator("--latency-ms", "200")
    cluster()
    endpoint = make_endpoint(sim.base_url, concurrency=20)
    text = lambda i: f"Question {i % 10}"  # noqa: E731  30 requests, 10 different ones

    first = run(write, owner, endpoint, 30, text)
    assert sent(sim) == 10, (
        first.counts(),
        first.cache_hits,
        list(first.items.values_list("custom_id", "from_cache", "attempts")),
    )
    assert (first.n_succeeded, first.cache_hits) == (30, 20), first.counts()
    answers = {i.custom_id: i.response for i in first.items.all()}
    assert all(answers[f"req-{i}"] == answers[f"req-{i % 10}"] for i in range(30))
    assert first.items.filter(from_cache=True).count() == 20
    assert first.cost > 0 and first.cache_saved == pytest.approx(first.cost * 2, abs=Decimal("0.000002"))

    second = run(write, owner, endpoint, 30, text)
    assert sent(sim) == 10  # nothing more went upstream
    assert (second.n_succeeded, second.cache_hits, second.cost) == (30, 30, 0), second.counts()
    assert second.prompt_tokens == second.completion_tokens == 0
    assert second.cache_saved == pytest.approx(first.cost * 3, abs=Decimal("0.000003"))
    assert {i.custom_id: i.response for i in second.items.all()} == answers
    assert CachedAnswer.objects.get(
        key=cache_key(endpoint.pk, endpoint.base_url, CHAT, second.items.get(custom_id="req-3").body)
    ).hits

    without = run(write, owner, endpoint, 30, text, use_cache=False)
    assert sent(sim) == 40 and without.cache_hits == 0  # a job that does not ask never reads the cache

    CachedAnswer.objects.update(
        answered_at=timezone.now() - timedelta(hours=settings.BATCHSITE_CACHE_MAX_AGE_HOURS + 1)
    )
    stale = run(write, owner, endpoint, 30, text)
    assert sent(sim) == 50 and stale.cache_hits == 20  # too old: sent again (once each), and cached afresh


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_twin_lets_the_others_send_their_own(cluster, simulator, write, owner):
    sim = simulator("--latency-ms", "50")
    cluster()
    # Every copy of the request fails for good (400): none may wait for ever on an answer that never comes.
    job = run(write, owner, make_endpoint(sim.base_url), 6, lambda i: "Question SIMULATE_400")
    assert (job.n_failed, job.n_succeeded) == (6, 0) and job.status == Job.Status.COMPLETED
    assert not CachedAnswer.objects.exclude(sending_lease=None).exists()
    assert job.items.filter(status=Item.Status.FAILED, from_cache=False).count() == 6


@pytest.mark.django_db
def test_trim_drops_old_answers_and_keeps_the_newest_within_the_bound(settings):
    from tests.factories import make_endpoint as endpoint_for

    endpoint = endpoint_for("http://127.0.0.1:9/v1")
    now = timezone.now()
    for i in range(5):
        CachedAnswer.objects.create(
            key=f"k{i}", endpoint=endpoint, url=CHAT, response="{}", answered_at=now - timedelta(minutes=i)
        )
    CachedAnswer.objects.create(
        key="old", endpoint=endpoint, url=CHAT, response="{}", answered_at=now - timedelta(days=30)
    )
    settings.BATCHSITE_CACHE_MAX_ENTRIES = 3
    assert answercache.trim(now) == 3
    assert set(CachedAnswer.objects.values_list("key", flat=True)) == {"k0", "k1", "k2"}


@pytest.mark.django_db
def test_trim_keeps_the_newest_answers_within_the_byte_bound(settings):
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    now = timezone.now()
    sizes = {"new-small": 100, "big": 800_000, "older": 300_000, "oldest": 100}  # newest first
    for i, (key, size) in enumerate(sizes.items()):
        CachedAnswer.objects.create(
            key=key, endpoint=endpoint, url=CHAT, response="x" * size, answered_at=now - timedelta(minutes=i)
        )
    settings.BATCHSITE_CACHE_MAX_MB = 1  # 1,048,576 characters: the first three pass it

    assert answercache.trim(now) == 2

    assert set(CachedAnswer.objects.values_list("key", flat=True)) == {"new-small", "big"}
    settings.BATCHSITE_CACHE_MAX_MB = 1024
    assert answercache.trim(now) == 0


@pytest.mark.django_db
@pytest.mark.usefixtures("data_dir")
def test_the_form_and_v1_ask_for_the_cache_and_staff_clear_it(client, owner, staff):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.factories import api_headers, chat_line, jsonl

    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    client.force_login(owner)
    content = jsonl([chat_line("a"), chat_line("b")])
    launch = {"name": "", "endpoint": endpoint.pk, "max_attempts": 5, "action": "launch", "mode": "live"}
    for use_cache in (True, False):
        url = client.post("/jobs/new/", {"file": SimpleUploadedFile("in.jsonl", content)}).url
        page = client.get(url).content.decode()
        assert "Reuse cached answers" in page and "at a temperature above 0 you get the same text" in page
        client.post(url, {**launch, **({"use_cache": "on"} if use_cache else {})})
    cached, plain = Job.objects.order_by("pk")
    assert (cached.use_cache, plain.use_cache) == (True, False)
    Job.objects.filter(pk=cached.pk).update(cache_hits=2, cache_saved=Decimal("0.0123"))
    assert "From the cache" in client.get(f"/jobs/{cached.pk}/").content.decode()
    assert "saved $0.0123" in client.get(f"/jobs/{cached.pk}/").content.decode()
    assert "From the cache" not in client.get(f"/jobs/{plain.pk}/").content.decode()

    headers = api_headers(owner)
    file = client.post(
        "/v1/files", {"file": SimpleUploadedFile("in.jsonl", content), "purpose": "batch"}, headers=headers
    ).json()
    body = {"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h"}
    bad = client.post(
        "/v1/batches",
        {**body, "metadata": {"batchsite_cache": "maybe"}},
        content_type="application/json",
        headers=headers,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata.batchsite_cache"
    ok = client.post(
        "/v1/batches",
        {**body, "metadata": {"batchsite_cache": "true"}},
        content_type="application/json",
        headers=headers,
    )
    assert ok.status_code == 200 and Job.objects.latest("pk").use_cache

    now = timezone.now()
    CachedAnswer.objects.create(key="done", endpoint=endpoint, url=CHAT, response="{}", answered_at=now)
    CachedAnswer.objects.create(key="busy", endpoint=endpoint, url=CHAT, sending_lease=uuid.uuid4(), sending_until=now)
    assert client.post("/endpoints/cache/clear").status_code == 403  # staff only
    client.force_login(staff)
    assert "1 answer kept" in client.get("/endpoints/").content.decode()
    assert client.get("/endpoints/cache/clear").status_code == 405
    response = client.post("/endpoints/cache/clear", follow=True)
    assert "1 answer removed" in response.content.decode()
    assert list(CachedAnswer.objects.values_list("key", flat=True)) == ["busy"]  # a send in flight keeps its row
