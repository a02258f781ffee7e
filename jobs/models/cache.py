"""The team's answer cache (issue 14): an answer given before to the identical request, reused by jobs that
ask for it (Job.use_cache) instead of being sent, and paid for, again."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal

from django.db import models


def cache_key(endpoint_id: int, base_url: str, url: str, body: str) -> str:
    """Same endpoint at the same server, same path, same body: key order and spacing do not make a request
    different. The server's URL is part of it: an endpoint moved to another server does not get the old
    server's answers."""
    canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{endpoint_id}\n{base_url}\n{url}\n{canonical}".encode()).hexdigest()


class CachedAnswer(models.Model):
    key = models.CharField(max_length=64, unique=True)
    endpoint = models.ForeignKey("jobs.Endpoint", on_delete=models.CASCADE, related_name="+")
    url = models.CharField(max_length=100)
    model = models.CharField(max_length=200, blank=True)
    response = models.TextField(blank=True, help_text="Empty while the first request for it is being sent")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(
        max_digits=12, decimal_places=8, default=Decimal(0), help_text="What the answer cost: what each hit saves"
    )
    answered_at = models.DateTimeField(null=True, blank=True, db_index=True)
    # A slice sending the request now: other items with the same key wait for its answer instead of
    # sending their own (duplicates inside a job, or identical jobs running at once).
    sending_lease = models.UUIDField(null=True, blank=True, db_index=True)
    sending_until = models.DateTimeField(null=True, blank=True)
    hits = models.PositiveIntegerField(default=0)
    last_hit_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "cached answer"

    def __str__(self) -> str:
        return f"{self.url} {self.model} {self.key[:12]}"
