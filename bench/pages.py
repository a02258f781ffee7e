"""Server time and query count of every dashboard page with 1,000 jobs in history and a 50,000-item job
that has run for a day (8,640 timeline ticks).

Baseline in the same run: Django's own login page (no data) — what "no work at all" costs here.
Target (issue 4): every page and partial < 100 ms, a bounded number of queries.
Then the three endpoints clients poll while a job runs, as server CPU per poll (thread CPU time around
the test client's call: Django, the template and SQLite all run in this thread), target <= 2 ms
(issue 9): GET /v1/batches/{id}, GET /v1/batches, and the dashboard's progress partial.
Usage: .venv/bin/python bench/pages.py [--polls-only]
"""

import json
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import django_in_tempdir

REPEAT = 7
POLLS = 300


def main() -> None:
    data_dir = django_in_tempdir("batchsite-pages-")
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from jobs import ingest
    from jobs.models import ApiToken, Batch, File, Item, Job, JobTick, ledger

    user = User.objects.create_user("bench", password="bench-pass-123", is_staff=True)
    path = data_dir / "big.jsonl"
    with open(path, "w") as f:
        for i in range(50_000):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Question {i}"}]}
            f.write(
                json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
                + "\n"
            )
    big = ingest.create_job(ingest.validate(path), owner=user, name="big")
    answer = json.dumps(
        {
            "choices": [{"message": {"role": "assistant", "content": "An answer."}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3},
        }
    )
    Item.objects.filter(job=big, line__lte=30_000).update(
        status=Item.Status.SUCCEEDED, http_status=200, response=answer, prompt_tokens=9, completion_tokens=3
    )
    Item.objects.filter(job=big, line__gt=30_000, line__lte=31_000).update(
        status=Item.Status.FAILED, http_status=500, error_code="http_500", error_message="Server error"
    )
    ledger.recount(big)
    Job.objects.filter(pk=big.pk).update(status=Job.Status.RUNNING)
    Job.objects.bulk_create(
        [
            Job(
                owner=user,
                name=f"history {i}",
                url="/v1/chat/completions",
                model="gpt-4o-mini",
                status=Job.Status.COMPLETED,
                total=100,
                n_succeeded=100,
            )
            for i in range(1000)
        ]
    )
    item = big.items.filter(status=Item.Status.SUCCEEDED).first()
    # A day-long run's timeline: the chart buckets all 8,640 ten-second ticks on every poll.
    start = timezone.now() - timedelta(days=1)
    JobTick.objects.bulk_create(
        [JobTick(job=big, at=start + timedelta(seconds=10 * i), succeeded=3, failed=1) for i in range(8640)]
    )

    client = Client()
    client.force_login(user)
    # The big job as an API batch, and a page of finished ones, for the /v1 polls.
    input_file = File.objects.create(owner=user, filename="big.jsonl", purpose=File.BATCH, path="big.jsonl")
    batch = Batch.objects.create(job=big, input_file=input_file)
    for job in Job.objects.filter(name__startswith="history")[:19]:
        Batch.objects.create(job=job, input_file=input_file)
    _, token = ApiToken.create_for(user, "bench")
    api = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    polls = {
        "GET /healthz (floor: the stack, one query)": ("/healthz", {}),
        "GET /v1/batches/{id} (running, 50k items)": (f"/v1/batches/{batch.public_id}", api),
        "GET /v1/batches (20 batches)": ("/v1/batches", api),
        "progress partial (htmx)": (f"/jobs/{big.pk}/progress", {"HTTP_HX_REQUEST": "true"}),
    }
    api_client = Client()
    print(f"Server CPU per poll, mean of {POLLS} (target <= 2 ms)")
    for name, (url, headers) in polls.items():
        c = api_client if url.startswith("/v1/") else client
        first = c.get(url, **headers)
        assert first.status_code == 200, (url, first.status_code, first.content[:300])
        start = time.thread_time()
        for _ in range(POLLS):
            c.get(url, **headers)
        cpu = (time.thread_time() - start) * 1000 / POLLS
        line = f"  {name:44} {cpu:6.2f} ms CPU"
        if first.has_header("ETag"):
            start = time.thread_time()
            for _ in range(POLLS):
                again = c.get(url, HTTP_IF_NONE_MATCH=first["ETag"], **headers)
            assert again.status_code == 304, (url, again.status_code)
            line += f"   {(time.thread_time() - start) * 1000 / POLLS:6.2f} ms when unchanged (304)"
        print(line)
    if "--polls-only" in sys.argv:
        return
    pages = {
        "login page (baseline, anonymous)": ("/login/", Client()),
        "job list": ("/", client),
        "job list, filtered + search": ("/?scope=mine&status=completed&q=history&page=3", client),
        "job list, htmx poll": ("/", client, {"HTTP_HX_REQUEST": "true", "HTTP_HX_TARGET": "job-table"}),
        "job detail (50k items, day-long chart)": (f"/jobs/{big.pk}/", client),
        "progress partial": (f"/jobs/{big.pk}/progress", client, {"HTTP_HX_REQUEST": "true"}),
        "items, page 1": (f"/jobs/{big.pk}/items/", client),
        "items, page 500": (f"/jobs/{big.pk}/items/?page=500", client),
        "items, failed only": (f"/jobs/{big.pk}/items/?status=failed&page=10", client),
        "items, custom_id search": (f"/jobs/{big.pk}/items/?q=req-4999", client),
        "item detail": (f"/jobs/{big.pk}/items/{item.pk}/", client),
        "usage": ("/usage/", client),
        "endpoints": ("/endpoints/", client),
        "team": ("/team/", client),
        "API tokens": ("/account/tokens/", client),
    }
    print(f"1,000 jobs + one 50,000-item job, SQLite, median of {REPEAT}")
    print(f"  {'page':40} {'ms':>7} {'queries':>8}")
    baseline = None
    for name, (url, c, *extra) in pages.items():
        headers = extra[0] if extra else {}
        c.get(url, **headers)
        times = []
        for _ in range(REPEAT):
            with CaptureQueriesContext(connection) as queries:
                start = time.perf_counter()
                response = c.get(url, **headers)
                times.append((time.perf_counter() - start) * 1000)
            assert response.status_code in (200, 286), (url, response.status_code)
        ms = statistics.median(times)
        baseline = baseline or ms
        print(f"  {name:40} {ms:7.1f} {len(queries):8d}   {ms / baseline:5.1f}x baseline")


if __name__ == "__main__":
    main()
