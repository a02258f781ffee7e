"""The README's pictures, from a real run: `make screenshots` (about two minutes).

A throwaway data dir and SQLite database, the simulator (latency 300 ms, 1,800 requests a minute),
a qcluster and gunicorn, as `make run` starts them. A 2,400-request job runs through a 429 storm
half-way (the chart shows it); Chromium photographs the pages into docs/.

    .venv/bin/python scripts/screenshots.py [--out docs] [--items 2400]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from _setup import django_in_tempdir  # noqa: E402

# Playwright's sync API runs an event loop in this thread; the ORM calls here are ours, between its calls.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

REVIEWS = [
    "The blender arrived two days late and the lid cracked, but support replaced it quickly.",
    "Battery life is great and the screen is sharp. Would buy again.",
    "Stopped working after a week. Nobody answered my emails.",
    "Does what it says. The manual could be clearer.",
]


def write_input(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            text = REVIEWS[i % len(REVIEWS)] + (" SIMULATE_400" if i % 97 == 13 else "")
            body = {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Classify the review's sentiment in one word."},
                    {"role": "user", "content": f"Review {i}: {text}"},
                ],
                "max_tokens": 20,
            }
            f.write(
                json.dumps({"custom_id": f"review-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
                + "\n"
            )
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--items", type=int, default=2400)
    args = parser.parse_args()
    if not Path("/usr/bin/chromium").exists():
        sys.exit("Needs Debian's Chromium: apt-get install chromium (make test installs it too).")

    data_dir = django_in_tempdir("batchsite-shots-")
    from django.contrib.auth.models import User
    from playwright.sync_api import sync_playwright

    from jobs import ingest
    from jobs.engine import tasks
    from jobs.models import Endpoint, Job
    from tests.servers import Cluster, Simulator, WebServer, wait_until

    tasks.ensure_schedules()
    User.objects.create_superuser("alice", password="alice-pass-123")
    args.out.mkdir(exist_ok=True)
    started = []
    try:
        sim = Simulator(data_dir, "--latency-ms", "300", "--rpm", "1800", "--seed", "1")
        started.append(sim)
        endpoint = Endpoint.objects.create(name="simulator", base_url=sim.base_url, concurrency=100, is_default=True)
        endpoint.set_api_key("sk-simulator")
        endpoint.save()
        started.append(Cluster(data_dir, BATCHSITE_LEASE_SECONDS="120", BATCHSITE_SLICE_SECONDS="60"))
        web = WebServer(data_dir)
        started.append(web)
        plan = ingest.validate(
            write_input(data_dir / "reviews.jsonl", args.items), format=Job.Format.JSONL, source_name="reviews.jsonl"
        )
        job = ingest.create_job(plan, owner=User.objects.get(), name="Review sentiment", endpoint=endpoint)
        job.start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(f"{web.url}/login/")
            page.fill("#id_username", "alice")
            page.fill("#id_password", "alice-pass-123")
            page.click("button[type=submit]")
            page.wait_for_url(f"{web.url}/")

            def done() -> int:
                return Job.objects.get(pk=job.pk).n_done

            wait_until(lambda: done() >= args.items * 0.3, 300, 1, "a third of the job")
            sim.configure(error_rates={"429": 0.35}, retry_after_ms=2000)
            wait_until(lambda: done() >= args.items * 0.5, 300, 1, "half of the job")
            page.goto(f"{web.url}/jobs/{job.pk}/")
            page.screenshot(path=str(args.out / "job-running.png"), full_page=True)
            sim.configure(error_rates={})
            wait_until(lambda: Job.objects.get(pk=job.pk).status == Job.Status.COMPLETED, 600, 1, "the job to complete")
            page.goto(f"{web.url}/jobs/{job.pk}/")
            page.screenshot(path=str(args.out / "job-detail.png"), full_page=True)
            browser.close()
        print(f"Wrote job-running.png and job-detail.png to {args.out}")
    finally:
        for process in reversed(started):
            process.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
