"""Planning: a job's pending items into chunks (jobs/remoteplan.py: one model each, under the endpoint's
request, byte and enqueued-token limits), each recorded as a RemoteBatch holding its items (the ledger's
take_into_chunk: running, no lease)."""

from __future__ import annotations

import json
from array import array
from collections import defaultdict

from django.db.models import Max

from jobs import remoteplan
from jobs.models import Endpoint, Item, Job, RemoteBatch, ledger

PLAN_ROWS = 5000  # rows read a query at a time
# The bytes a request's line adds to the input file beyond its custom_id, URL and body:
# {"custom_id":,"method":"POST","url":,"body":} and a newline.
LINE_OVERHEAD = len('{"custom_id":,"method":"POST","url":"","body":}\n')


def plan_chunks(job: Job, endpoint: Endpoint) -> int:
    """Pending items into new chunks, one transaction per chunk; returns how many chunks. A million pending
    items take a few compact arrays, not a million objects."""
    fixed = LINE_OVERHEAD + len(job.url.encode())
    ids, sizes, tokens, model_of = array("q"), array("q"), array("q"), array("l")
    models: dict[str, int] = {}
    pending = Item.objects.filter(job=job, status=Item.Status.PENDING).order_by("line")
    rows = pending.values_list("id", "custom_id", "body", "est_tokens").iterator(PLAN_ROWS)
    for item_id, custom_id, body, est in rows:
        data = json.loads(body)
        model = data.get("model") if isinstance(data.get("model"), str) else ""
        ids.append(item_id)
        sizes.append(fixed + len(body.encode()) + len(json.dumps(custom_id).encode()))
        tokens.append(remoteplan.request_tokens(data, est))
        model_of.append(models.setdefault(model, len(models)))
    if not ids:
        return 0
    names = {index: name for name, index in models.items()}
    made = 0
    by_model: dict[str, list[int]] = defaultdict(list)
    for position in range(len(ids)):
        by_model[names[model_of[position]]].append(position)
    for model, positions in by_model.items():
        # 5% below the byte limit: a limit of "200 MB" may be counted in decimal megabytes (0.95 x 200 MiB is
        # 199.2 million bytes).
        limits = remoteplan.Limits(
            endpoint.batch_max_requests, int(endpoint.batch_max_bytes * 0.95), endpoint.token_limit(model)
        )
        requests = (remoteplan.Request(ids[p], model, sizes[p], tokens[p]) for p in positions)
        for chunk_requests in remoteplan.split(requests, limits):
            if not make_chunk(job, endpoint, model, chunk_requests):
                return made
            made += 1
    return made


def make_chunk(job: Job, endpoint: Endpoint, model: str, requests: list[remoteplan.Request]) -> bool:
    """One chunk and its items, in one transaction; False if the job no longer runs."""
    with ledger.open(job.pk) as books:
        if books.status != Job.Status.RUNNING:
            return False
        number = (job.remote_batches.aggregate(n=Max("number"))["n"] or 0) + 1
        chunk = RemoteBatch.objects.create(
            job=job,
            endpoint=endpoint,
            number=number,
            model=model,
            n_items=len(requests),
            est_tokens=sum(r.tokens for r in requests),
            bytes=sum(r.bytes for r in requests),
        )
        taken = books.take_into_chunk(chunk, [r.id for r in requests])
        if taken != len(requests):  # some were cancelled meanwhile
            RemoteBatch.objects.filter(pk=chunk.pk).update(n_items=taken)
    return True
