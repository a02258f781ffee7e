"""Ingest and export speed and memory for a 50,000-line chat JSONL.

Each phase runs in a fresh child process so its peak RSS is its own. Baselines in the same run:
- parse floor: read the file and json.loads every line, nothing else;
- bulk_create: the same Items saved with Django's bulk_create (the obvious implementation).

Usage: .venv/bin/python bench/ingest_export.py [LINES]
Targets (issue 2): ingest <= 5 s, export <= 3 s, peak RSS <= 200 MB.
"""

import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import django_in_tempdir

LINES = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000


def make_file(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            body = {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "You are a careful analyst. Answer in one short paragraph."},
                    {
                        "role": "user",
                        "content": f"Review #{i}: The blender arrived two days late and the lid cracked, "
                        "but support replaced it quickly. Is this customer happy? Explain briefly.",
                    },
                ],
                "max_tokens": 200,
                "temperature": 0.2,
            }
            f.write(
                json.dumps({"custom_id": f"review-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
                + "\n"
            )


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase(name: str, path: str, queue) -> None:
    from django.contrib.auth.models import User

    from jobs import export, ingest
    from jobs.models import Item, Job

    user, _ = User.objects.get_or_create(username="bench")
    start = time.perf_counter()
    if name == "parse":
        n = 0
        with open(path, "rb") as f:
            for line in f:
                json.loads(line)
                n += 1
    elif name == "ingest":
        plan = ingest.validate(Path(path))
        assert plan.ok, plan.errors[:3]
        validated = time.perf_counter()
        job = ingest.create_job(plan, owner=user)
        queue.put(("validate_s", validated - start))
        queue.put(("job_id", job.pk))
    elif name == "bulk_create":
        job = Job.objects.create(owner=user, name="baseline", url="/v1/chat/completions")
        batch = []
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                obj = json.loads(line)
                batch.append(Item(job=job, line=n, custom_id=obj["custom_id"], body=json.dumps(obj["body"])))
                if len(batch) == 5000:
                    Item.objects.bulk_create(batch)
                    batch = []
        Item.objects.bulk_create(batch)
    elif name == "export":
        job = Job.objects.filter(name=Path(path).stem).latest("pk")
        size = sum(len(chunk) for chunk in export.results_jsonl(job))
        queue.put(("export_bytes", size))
        csv_start = time.perf_counter()
        sum(len(chunk) for chunk in export.results_csv(job))
        queue.put(("csv_s", time.perf_counter() - csv_start))
        start += time.perf_counter() - csv_start  # export_s below is the JSONL export alone
    elif name == "complete":
        # Stand-in for the runner: give every item a realistic stored response.
        job = Job.objects.filter(name=Path(path).stem).latest("pk")
        answer = json.dumps(
            {
                "id": "chatcmpl-x",
                "object": "chat.completion",
                "created": 1,
                "model": "gpt-4o-mini",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "The customer is mostly happy: " * 4},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 60, "completion_tokens": 40, "total_tokens": 100},
            },
            separators=(",", ":"),
        )
        Item.objects.filter(job=job).update(status=Item.Status.SUCCEEDED, http_status=200, response=answer)
    queue.put((f"{name}_s", time.perf_counter() - start))
    queue.put((f"{name}_rss_mb", peak_mb()))


def run(name: str, path: Path) -> dict:
    queue = mp.Queue()
    child = mp.Process(target=phase, args=(name, str(path), queue))
    child.start()
    child.join()
    assert child.exitcode == 0, f"{name} failed"
    out = {}
    while not queue.empty():
        key, value = queue.get()
        out[key] = value
    return out


def main() -> None:
    data_dir = django_in_tempdir("batchsite-bench-")
    path = data_dir / "reviews.jsonl"
    make_file(path, LINES)
    mb = path.stat().st_size / 1e6
    r = {}
    for name in ("parse", "ingest", "bulk_create", "complete", "export"):
        r.update(run(name, path))
    print(f"{LINES:,} chat requests, {mb:.1f} MB JSONL, SQLite in {data_dir}")
    print(f"  json.loads floor        {r['parse_s']:6.2f} s")
    print(
        f"  ingest (validate+save)  {r['ingest_s']:6.2f} s  (validate {r['validate_s']:.2f} s)  peak RSS {r['ingest_rss_mb']:.0f} MB"
        f"   target <= 5 s, <= 200 MB"
    )
    print(f"  baseline bulk_create    {r['bulk_create_s']:6.2f} s  (no validation, no token estimate)")
    print(
        f"  export results JSONL    {r['export_s']:6.2f} s  ({r['export_bytes'] / 1e6:.0f} MB)  peak RSS {r['export_rss_mb']:.0f} MB"
        f"   target <= 3 s"
    )
    print(f"  export CSV              {r['csv_s']:6.2f} s")
    print(f"  ratio ingest / json.loads floor:   {r['ingest_s'] / r['parse_s']:.1f}x")
    print(f"  ratio ingest / plain bulk_create:  {r['ingest_s'] / r['bulk_create_s']:.2f}x  (lower is better)")


if __name__ == "__main__":
    main()
