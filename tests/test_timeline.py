"""The job's throughput chart covers its whole run, whatever its length, and drives the rate and ETA."""

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import timeline
from jobs.models import Job, JobTick
from jobs.templatetags.batchsite import duration
from tests.factories import make_endpoint, make_job

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(write, owner):
    return make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 10, start=False)


def tick(job, at, succeeded=0, failed=0, retried=0):
    JobTick.objects.create(job=job, at=at, succeeded=succeeded, failed=failed, retried=retried)


def test_a_two_hour_finished_job_is_charted_whole(job):
    start = timezone.now().replace(microsecond=0, second=0) - timedelta(hours=3)
    for i in range(720):  # two hours of 10-second ticks, 5 done in each
        tick(job, start + timedelta(seconds=10 * i), succeeded=4, failed=1)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.COMPLETED)
    job.refresh_from_db()
    t = timeline.for_job(job)
    assert t.bucket_seconds == 120 and len(t.bars) == 60
    assert sum(b["succeeded"] for b in t.bars) == 2880 and sum(b["failed"] for b in t.bars) == 720
    assert t.span_seconds == 7200 and t.peak_rate == 0.5
    assert t.rate == 0 and t.eta is None  # finished: no "now" figures
    assert t.bars[0]["at"] == start and t.bars[-1]["x"] < 100


def test_a_stall_shows_as_empty_bars_and_the_eta_comes_from_the_last_minute(job):
    now = timezone.now()
    tick(job, now - timedelta(seconds=300), succeeded=50)
    tick(job, now - timedelta(seconds=30), succeeded=6)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.RUNNING, n_pending=4)
    job.refresh_from_db()
    t = timeline.for_job(job, now=now)
    assert t.bucket_seconds == 10 and len(t.bars) == 30
    assert [b["succeeded"] for b in t.bars].count(0) == 28  # the gap between the two ticks is visible
    assert t.rate == pytest.approx(0.1) and t.eta == pytest.approx(40)


def test_failed_stack_on_succeeded_and_retries_are_a_line_on_the_same_scale(job):
    start = timezone.now().replace(microsecond=0) - timedelta(minutes=5)
    tick(job, start, succeeded=30, failed=10)
    tick(job, start + timedelta(seconds=10), succeeded=20, retried=100)  # a 429 storm: more retried than done
    tick(job, start + timedelta(seconds=20), succeeded=40)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.COMPLETED)
    job.refresh_from_db()
    first, storm, last = timeline.for_job(job).bars
    assert first["h"] == 60 and first["fh"] == 15 and first["sh"] == 45 and first["sy"] == first["y"] + 15 == 19
    assert storm["fh"] == 0 and storm["sh"] == storm["h"] == 30
    assert storm["ry"] == 2 and first["ry"] == last["ry"] == 64  # capped near the top; none is the baseline
    points = timeline.for_job(job).retried_points.split()
    assert len(points) == 3 and points[1].endswith(",2")


def test_no_retries_no_retries_line(job):
    tick(job, timezone.now() - timedelta(seconds=60), succeeded=3)
    tick(job, timezone.now() - timedelta(seconds=40), succeeded=3)
    assert timeline.for_job(job).retried_points == ""


def test_a_young_job_rates_over_its_life_so_far_not_a_whole_minute(job):
    now = timezone.now()
    tick(job, now - timedelta(seconds=8), succeeded=40)
    Job.objects.filter(pk=job.pk).update(
        status=Job.Status.RUNNING, n_pending=400, started_at=now - timedelta(seconds=10)
    )
    job.refresh_from_db()
    t = timeline.for_job(job, now=now)
    assert t.rate == pytest.approx(4.0) and t.eta == pytest.approx(100)
    Job.objects.filter(pk=job.pk).update(started_at=now - timedelta(seconds=1))
    job.refresh_from_db()
    assert timeline.for_job(job, now=now).rate == pytest.approx(8.0)  # at least 5 s: one burst is not a rate


def test_no_ticks_no_chart(job):
    assert timeline.for_job(job).bars == []


@pytest.mark.parametrize(
    "seconds,text",
    [
        (4.4, "4 s"),
        (59, "59 s"),
        (90, "1 min 30 s"),
        (120, "2 min"),
        (599.6, "10 min"),
        (1530, "26 min"),
        (3600, "1 h"),
        (7500, "2 h 5 min"),
        (90000, "1 d 1 h"),
        (None, ""),
    ],
)
def test_duration(seconds, text):
    assert duration(seconds) == text
