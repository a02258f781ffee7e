"""Server time and query count of every dashboard page with 1,000 jobs in history and a 50,000-item job
that has run for a day (8,640 timeline ticks).

Baseline in the same run: Django's own login page (no data) — what "no work at all" costs here.
Target (issue 4): every page and partial < 100 ms, a bounded number of queries.
Usage: .venv/bin/python bench/pages.py
"""

import json
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import django_in_tempdir  # noqa: E402

REPEAT = 7


def main() -> None:
    data_dir = django_in_tempdir("batchsite-pages-")
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from jobs import ingest
    from django.utils import timezone

    from jobs.models import Item, Job, JobTick

    user = User.objects.create_user("bench", password="bench-pass-123", is_staff=True)
    path = data_dir / "big.jsonl"
    with open(path, "w") as f:
        for i in range(50_000):
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Question {i}"}]}
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")
    big = ingest.create_job(ingest.validate(path), owner=user, name="big")
    answer = json.dumps({"choices": [{"message": {"role": "assistant", "content": "An answer."}}], "usage": {"prompt_tokens": 9, "completion_tokens": 3}})
    Item.objects.filter(job=big, line__lte=30_000).update(status=Item.SUCCEEDED, http_status=200, response=answer, prompt_tokens=9, completion_tokens=3)
    Item.objects.filter(job=big, line__gt=30_000, line__lte=31_000).update(status=Item.FAILED, http_status=500, error_code="http_500", error_message="Server error")
    big.recount()
    Job.objects.filter(pk=big.pk).update(status=Job.RUNNING)
    Job.objects.bulk_create(
        [Job(owner=user, name=f"history {i}", url="/v1/chat/completions", model="gpt-4o-mini", status=Job.COMPLETED, total=100, n_succeeded=100)
         for i in range(1000)]
    )  # fmt: skip
    item = big.items.filter(status=Item.SUCCEEDED).first()
    # A day-long run's timeline: the chart buckets all 8,640 ten-second ticks on every poll.
    start = timezone.now() - timedelta(days=1)
    JobTick.objects.bulk_create([JobTick(job=big, at=start + timedelta(seconds=10 * i), succeeded=3, failed=1) for i in range(8640)])

    client = Client()
    client.force_login(user)
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
