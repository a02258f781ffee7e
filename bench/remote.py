"""One job three ways on the simulator: live, through the Batch API (remote), and hybrid with a deadline.

Everything runs in this process, on a throwaway data dir and SQLite database: the simulator in a thread
(chat answers after --latency-ms; a batch takes --batch-seconds, a cancel --cancel-seconds to settle),
and the engine driven as the cluster drives it, without a qcluster: a round of the remote poller
(remote.poll_round) every second, and live slices (runner.run, one at a time with the endpoint's
whole concurrency) whenever the job has live work. The same N chat requests run as:
  - live: slices only, at full price;
  - remote: one Batch API batch, at the endpoint's batch discount;
  - hybrid: remote, with a deadline shorter than the batch takes; the engine cancels the batch at its
    planned switch and runs what the batch had not answered live.
For each: wall time from start to the job finished, requests sent live (the simulator's count) and
answered by the Batch API (items joined from a batch's output), cost (the price table; the Batch API
part discounted), ratios to live, and the check that every request has exactly one result: each
custom_id once in the job's output + error files, no request answered both live and in a batch output
file, the simulator's live count equal to the live results.

    .venv/bin/python bench/remote.py [--items 2000] [--latency-ms 200] [--concurrency 100]
                                     [--batch-seconds 20] [--cancel-seconds 1] [--deadline 15] [--margin 2]

Targets: remote and the Batch API part of hybrid at half price; hybrid done by its deadline, cheaper
than live; exactly one result per request in every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.request
from collections import Counter
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import django_in_tempdir
from throughput import loadavg, make_file


def sim_call(base_url: str, path: str, payload: dict | None = None) -> dict:
    request = urllib.request.Request(
        base_url.removesuffix("/v1") + path,
        data=json.dumps(payload).encode() if payload is not None else None,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def drive(job, timeout: float) -> float:
    """Poller rounds once a second and live slices while the job has live work, until it is finished.
    Returns the seconds from the job's start to its last result."""
    from jobs.engine import remote, runner

    started = time.monotonic()
    while not job.is_finished:
        if time.monotonic() - started > timeout:
            raise SystemExit(f"job {job.pk} not finished after {timeout:.0f} s: {job.status} {job.counts()}")
        remote.poll_round()
        job.refresh_from_db()
        if job.n_pending and not job.runs_remotely:
            runner.run(job.pk, slices=1)
        elif not job.is_finished:
            time.sleep(1.0)  # the poller's pace between rounds (remote.poll)
        job.refresh_from_db()
    return (job.finished_at - job.started_at).total_seconds()


def batch_output_ids(base_url: str, job_id: int) -> list[str]:
    """custom_ids of every line in the output files of the job's batches at the simulator: what the Batch
    API answered (and would bill)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="sk-bench-simulator-key")
    ids = []
    for batch in client.batches.list():
        if (batch.metadata or {}).get("batchsite_job") == str(job_id) and batch.output_file_id:
            for line in client.files.content(batch.output_file_id).text.splitlines():
                ids.append(json.loads(line)["custom_id"])
    return ids


def timeline(job) -> str:
    """When the hybrid job's steps happened, in seconds from its start."""
    from jobs.models import Endpoint

    def at(moment) -> str:
        return f"{(moment - job.started_at).total_seconds():.1f} s" if moment else "never"

    steps = []
    for chunk in job.remote_batches.all():
        steps.append(f"chunk {chunk.number} ({chunk.n_items:,} requests) planned {at(chunk.created_at)}")
        if not chunk.batch_id:
            steps.append("never sent")
        if chunk.cancel_requested_at:
            steps.append(f"cancel sent {at(chunk.cancel_requested_at)}")
        answered = chunk.items.filter(status="succeeded").count()
        steps.append(f"{chunk.status} and its {answered:,} answers joined {at(chunk.collected_at)}")
    steps.insert(1, f"switch to live {at(job.switched_at)}")
    learned = Endpoint.objects.get(pk=job.endpoint_id).learned_cancel_seconds
    steps.append(f"done {at(job.finished_at)}")
    return ", ".join(steps) + (f" (cancel settle time learned from it: {learned} s)" if learned else "")


def run(mode: str, path: Path, owner, endpoint, base_url: str, deadline_s: float | None) -> dict:
    from django.utils import timezone

    from jobs import export, ingest
    from jobs.models import Job, ledger

    sim_call(base_url, "/_sim/reset", {})
    plan = ingest.validate(path)
    assert plan.ok, plan.errors
    job = ingest.create_job(plan, owner=owner, endpoint=endpoint, name=mode, options=ingest.RunOptions(mode=mode))
    deadline = timezone.now() + timedelta(seconds=deadline_s) if deadline_s else None  # from the start on
    Job.objects.filter(pk=job.pk).update(deadline=deadline)
    job.start()
    seconds = drive(job, timeout=600)

    items = job.items.all()
    live = set(items.filter(latency_ms__isnull=False).values_list("custom_id", flat=True))
    answered_remote = set(
        items.filter(remote_batch__isnull=False, status="succeeded").values_list("custom_id", flat=True)
    )
    results: Counter[str] = Counter()
    for text in (*export.results_jsonl(job), *export.errors_jsonl(job)):
        for line in text.splitlines():
            results[json.loads(line)["custom_id"]] += 1
    in_batch_files = batch_output_ids(base_url, job.pk) if mode != Job.Mode.LIVE else []
    sent_live = sim_call(base_url, "/_sim/stats")["by_path"].get(job.url, 0)
    ledger.recount(job)
    return {
        "mode": mode,
        "job": job,
        "seconds": seconds,
        "sent_live": sent_live,
        "remote": len(answered_remote),
        "cost": job.cost,
        "one_each": (
            len(results) == job.total
            and set(results.values()) == {1}
            and job.n_succeeded == job.total
            and sent_live == len(live)
            and not live & set(in_batch_files)
            and len(in_batch_files) == len(set(in_batch_files))
        ),
        "both": len(live & set(in_batch_files)),
        "deadline": deadline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--batch-seconds", type=float, default=20)
    parser.add_argument("--cancel-seconds", type=float, default=1)
    parser.add_argument("--deadline", type=float, default=15, help="hybrid: seconds from the start")
    parser.add_argument("--margin", type=int, default=2, help="BATCHSITE_HYBRID_MARGIN_SECONDS for this run")
    args = parser.parse_args()

    os.environ["BATCHSITE_SLICES_PER_JOB"] = "1"  # one slice at a time in this process, with all the concurrency
    os.environ["BATCHSITE_HYBRID_MARGIN_SECONDS"] = str(args.margin)
    os.environ["BATCHSITE_REMOTE_DELETE_FILES"] = "0"  # batch_output_ids reads the output files afterwards
    os.environ.setdefault("LOG_LEVEL", "WARNING")  # no line per batch step
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "REDIS_URL", "DATABASE_URL"):
        os.environ.pop(name, None)
    data_dir = django_in_tempdir("batchsite-remote-")

    from django.conf import settings
    from django.contrib.auth.models import User

    import jobs.queue
    from jobs.models import Endpoint, Job
    from simulator import SimConfig, serve_in_thread  # the package: django_in_tempdir put the root first on sys.path

    jobs.queue.async_task = lambda *a, **k: None  # no cluster: drive() runs the slices and poller rounds
    print(
        f"Remote: {args.items:,} chat requests, simulator latency {args.latency_ms:.0f} ms, concurrency "
        f"{args.concurrency}; a batch takes {args.batch_seconds:g} s, a cancel {args.cancel_seconds:g} s to settle; "
        f"hybrid deadline {args.deadline:g} s; poll every {settings.BATCHSITE_REMOTE_POLL_SECONDS} s, hybrid margin "
        f">= {settings.BATCHSITE_HYBRID_MARGIN_SECONDS} s; data dir {data_dir}"
    )
    print(f"  load average at start: {loadavg()}")
    config = SimConfig(
        latency_ms=args.latency_ms, batch_seconds=args.batch_seconds, batch_cancel_seconds=args.cancel_seconds, seed=1
    )
    runs = []
    with serve_in_thread(config) as base_url:
        owner = User.objects.create_user("bench")
        endpoint = Endpoint(
            name="simulator",
            base_url=base_url,
            is_default=True,
            concurrency=args.concurrency,
            # What the simulator's cancel takes, as if learned: the default (600 s) would switch at once.
            batch_cancel_seconds=max(1, round(args.cancel_seconds)),
        )
        endpoint.set_api_key("sk-bench-simulator-key")
        endpoint.save()
        path = make_file(data_dir / "remote.jsonl", args.items)
        for mode, deadline in ((Job.Mode.LIVE, None), (Job.Mode.REMOTE, None), (Job.Mode.HYBRID, args.deadline)):
            runs.append(run(mode, path, owner, endpoint, base_url, deadline))

    live = runs[0]
    print(
        "  mode     wall time  sent live  answered by the Batch API  cost     time / live  cost / live  one result each"
    )
    for r in runs:
        job = r["job"]
        print(
            f"  {r['mode']:<7} {r['seconds']:7.1f} s  {r['sent_live']:>9,}  {r['remote']:>25,}  ${r['cost']:.4f}"
            f"  {r['seconds'] / live['seconds']:11.2f}  {r['cost'] / live['cost']:11.2f}  "
            f"{'yes' if r['one_each'] else 'NO'} ({job.n_succeeded:,}/{job.total:,} succeeded, "
            f"{r['both']} answered both live and by the Batch API)"
        )
    hybrid = runs[2]
    job = hybrid["job"]
    spare = (hybrid["deadline"] - job.finished_at).total_seconds()
    verdict = f"met with {spare:.1f} s to spare" if spare >= 0 else f"MISSED by {-spare:.1f} s"
    print(f"  hybrid deadline {verdict}; plan: {job.switch_note}")
    print(f"    {timeline(job)}")
    remote = runs[1]
    print(f"  ratio remote / live cost:             {remote['cost'] / live['cost']:.2f}   target 0.50")
    print(f"  ratio remote / live time:             {remote['seconds'] / live['seconds']:.2f}")
    print(f"  ratio hybrid / live cost:             {hybrid['cost'] / live['cost']:.2f}   target < 1")
    print(f"  ratio hybrid / live time:             {hybrid['seconds'] / live['seconds']:.2f}")
    print(f"  load average after: {loadavg()}")
    if all(r["one_each"] for r in runs):
        shutil.rmtree(data_dir, ignore_errors=True)
    else:
        raise SystemExit(f"a run did not give exactly one result per request; data dir kept: {data_dir}")


if __name__ == "__main__":
    main()
