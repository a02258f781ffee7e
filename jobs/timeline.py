"""A job's throughput over its whole run, from its 10-second JobTicks: the chart, the current rate and the ETA."""

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import BigIntegerField, F, Func, Max, Min, Sum
from django.utils import timezone

from jobs.models import Job, JobTick

SLOTS = 60  # bars in the chart, whatever the length of the run
RECENT = 60  # seconds behind "requests/s now" and the ETA
MIN_WINDOW = 5  # ... but no fewer: the first second's burst is not a rate


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
    retried_points: str = ""  # the retries line's SVG points; empty when nothing was retried

    @property
    def span_seconds(self) -> float:
        return (self.end - self.start).total_seconds() if self.start and self.end else 0.0


class Epoch(Func):
    """Seconds since 1970 of a datetime column, so the database can bucket ticks itself."""

    output_field = BigIntegerField()

    def as_sqlite(self, compiler, connection, **extra):
        return self.as_sql(
            compiler, connection, template="CAST(strftime('%%%%s', %(expressions)s) AS INTEGER)", **extra
        )

    def as_postgresql(self, compiler, connection, **extra):
        return self.as_sql(
            compiler, connection, template="CAST(EXTRACT(EPOCH FROM %(expressions)s) AS BIGINT)", **extra
        )


def for_job(job: Job, now: datetime | None = None, slots: int = SLOTS) -> Timeline:
    """Bucket the whole run into at most `slots` bars, so a two-day job shows its two days.

    The database sums the ticks per bar: a day-long run has 8,640 ticks, and the progress partial
    that draws them is polled every two seconds by every open page.
    """
    now = now or timezone.now()
    ticks = job.ticks.order_by()
    bounds = ticks.aggregate(first=Min("at"), last=Max("at"))
    if bounds["first"] is None:
        return Timeline()
    active = job.status in Job.ACTIVE
    start = bounds["first"]
    end = bounds["last"] + timedelta(seconds=JobTick.SECONDS)
    if active:  # while running, the chart reaches up to now: a stall shows as empty bars, not as nothing
        end = max(end, now)
    span = max((end - start).total_seconds(), JobTick.SECONDS)
    bucket = JobTick.SECONDS * max(1, math.ceil(span / slots / JobTick.SECONDS))
    n = max(1, min(slots, math.ceil(span / bucket)))
    sums = [[0, 0, 0] for _ in range(n)]
    rows = (
        ticks.annotate(i=(Epoch("at") - int(start.timestamp())) / bucket)
        .values("i")
        .annotate(s=Sum("succeeded"), f=Sum("failed"), r=Sum("retried"))
    )
    for row in rows:
        i = min(max(int(row["i"]), 0), n - 1)
        sums[i][0] += row["s"]
        sums[i][1] += row["f"]
        sums[i][2] += row["r"]
    recent_done = 0
    if active:
        recent = ticks.filter(at__gte=now - timedelta(seconds=RECENT)).aggregate(n=Sum(F("succeeded") + F("failed")))
        recent_done = recent["n"] or 0
    peak = max((s + f for s, f, _ in sums), default=0) or 1
    bars = [
        {
            "at": start + timedelta(seconds=i * bucket),
            "succeeded": succeeded,
            "failed": failed,
            "retried": retried,
            "done": succeeded + failed,
            "rate": (succeeded + failed) / bucket,
        }
        for i, (succeeded, failed, retried) in enumerate(sums)
    ]
    # At least 12 slots: a 30-second job gets a few bars, not three slabs across the page.
    width = place_bars(bars, "done", slots=max(n, 12))
    scale = 60 / peak
    for bar in bars:
        # Failed on top of succeeded, in the same bar; retries (429s, 5xx) as a line on the same scale,
        # capped at the top: a storm's retries can outnumber what finished.
        failed_h = scale * bar["failed"]
        bar["fh"] = round(failed_h, 2)
        bar["sy"], bar["sh"] = round(bar["y"] + failed_h, 2), round(max(bar["h"] - failed_h, 0), 2)
        bar["ry"] = round(64 - min(scale * bar["retried"], 62), 2)
    retried = (
        " ".join(f"{bar['x'] + width / 2:g},{bar['ry']:g}" for bar in bars) if any(b["retried"] for b in bars) else ""
    )
    # Over the last minute, or over the run so far while it is younger than that: 12 done in its first
    # 3 s is 4/s, not 0.2/s (and an ETA 20 times too long).
    window: float = RECENT
    if job.started_at is not None:
        window = min(RECENT, max((now - job.started_at).total_seconds(), MIN_WINDOW))
    rate = recent_done / window if active else 0.0
    remaining = job.n_pending + job.n_running
    eta = remaining / rate if rate > 0 and remaining and job.status in (Job.Status.RUNNING, Job.Status.QUEUED) else None
    return Timeline(
        bars=bars,
        bucket_seconds=bucket,
        bar_width=width,
        peak_rate=peak / bucket,
        start=start,
        end=end,
        rate=rate,
        eta=eta,
        retried_points=retried,
    )


def place_bars(bars: list[dict], key: str, slots: int) -> float:
    """Give each bar its x, y and h in the charts' SVG box (0 0 100 64), scaled to the largest `key`;
    return the bars' width."""
    peak = max((bar[key] for bar in bars), default=0) or 1
    slot = 100 / max(slots, 1)
    for i, bar in enumerate(bars):
        bar["h"] = round(60 * bar[key] / peak, 2)
        bar["x"], bar["y"] = round(i * slot, 3), round(64 - bar["h"], 2)
    return round(slot * 0.8, 3)
