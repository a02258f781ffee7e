"""A job's throughput over its whole run, from its 10-second JobTicks: the chart, the current rate and the ETA."""

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.utils import timezone

from jobs.models import Job, JobTick

SLOTS = 60  # bars in the chart, whatever the length of the run
RECENT = 60  # seconds behind "requests/s now" and the ETA


@dataclass
class Timeline:
    bars: list[dict] = field(default_factory=list)
    bucket_seconds: int = JobTick.SECONDS
    bar_width: float = 0.0
    peak_rate: float = 0.0
    start: datetime | None = None
    end: datetime | None = None
    rate: float = 0.0  # finished per second over the last minute; 0 unless the job is active
    eta: float | None = None  # seconds left at that rate

    @property
    def span_seconds(self) -> float:
        return (self.end - self.start).total_seconds() if self.start else 0.0


def for_job(job: Job, now: datetime | None = None, slots: int = SLOTS) -> Timeline:
    """Bucket the whole run into at most `slots` bars, so a two-hour job shows its two hours."""
    now = now or timezone.now()
    ticks = list(job.ticks.order_by("at").values_list("at", "succeeded", "failed", "retried"))
    if not ticks:
        return Timeline()
    active = job.status in Job.ACTIVE
    start = ticks[0][0]
    # While running, the chart reaches up to now: a stall shows as empty bars, not as nothing.
    end = max(now, ticks[-1][0] + timedelta(seconds=JobTick.SECONDS)) if active else ticks[-1][0] + timedelta(seconds=JobTick.SECONDS)
    span = max((end - start).total_seconds(), JobTick.SECONDS)
    bucket = JobTick.SECONDS * max(1, math.ceil(span / slots / JobTick.SECONDS))
    n = max(1, min(slots, math.ceil(span / bucket)))
    sums = [[0, 0, 0] for _ in range(n)]
    recent_done = 0
    for at, succeeded, failed, retried in ticks:
        i = min(int((at - start).total_seconds() // bucket), n - 1)
        sums[i][0] += succeeded
        sums[i][1] += failed
        sums[i][2] += retried
        if at >= now - timedelta(seconds=RECENT):
            recent_done += succeeded + failed
    peak = max((s + f for s, f, _ in sums), default=0) or 1
    width = 100 / max(n, 12)  # a 30-second job gets a few bars, not three slabs across the page
    bars = []
    for i, (succeeded, failed, retried) in enumerate(sums):
        done = succeeded + failed
        height = round(60 * done / peak, 2)
        bars.append({
            "at": start + timedelta(seconds=i * bucket), "succeeded": succeeded, "failed": failed, "retried": retried,
            "rate": done / bucket, "x": round(i * width, 3), "y": round(64 - height, 2), "h": height,
        })  # fmt: skip
    rate = recent_done / RECENT if active else 0.0
    remaining = job.n_pending + job.n_running
    eta = remaining / rate if rate > 0 and remaining and job.status in (Job.RUNNING, Job.QUEUED) else None
    return Timeline(bars=bars, bucket_seconds=bucket, bar_width=round(width * 0.8, 3), peak_rate=peak / bucket,
                    start=start, end=end, rate=rate, eta=eta)  # fmt: skip
