"""One URL per job action (jobs/web/urls.py): POST only; the owner or staff pause, resume, cancel, retry and
delete; anyone signed in may duplicate a job as their own."""

import pytest

from jobs.models import Item, Job, ledger
from tests.factories import make_endpoint, make_job

pytestmark = pytest.mark.django_db

ACTIONS = ["pause", "resume", "cancel", "retry", "duplicate", "delete"]
CONTROLS = ["pause", "resume", "cancel", "retry", "delete"]  # the owner's and staff's only
# A state each control succeeds from, and the status it leaves (None: the job is gone).
FROM_TO = {
    "pause": (Job.Status.QUEUED, Job.Status.PAUSED),
    "resume": (Job.Status.PAUSED, Job.Status.QUEUED),
    "cancel": (Job.Status.PAUSED, Job.Status.CANCELLED),
    "retry": (Job.Status.COMPLETED, Job.Status.QUEUED),
    "delete": (Job.Status.CANCELLED, None),
}


@pytest.fixture
def job(owner, write):
    return make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 3, start=False)


def ready_for(job: Job, action: str) -> Job:
    """The job in a state `action` succeeds from (a retry needs a failed item)."""
    if action == "retry":
        Item.objects.filter(pk=job.items.order_by("line").first().pk).update(status=Item.Status.FAILED)
        ledger.recount(job)
    Job.objects.filter(pk=job.pk).update(status=FROM_TO[action][0])
    job.refresh_from_db()
    return job


def status_of(job: Job) -> str | None:
    return Job.objects.filter(pk=job.pk).values_list("status", flat=True).first()


@pytest.mark.parametrize("action", ACTIONS)
def test_get_on_a_job_action_is_405_and_changes_nothing(client, owner, job, action):
    client.force_login(owner)
    assert client.get(f"/jobs/{job.pk}/{action}").status_code == 405
    assert list(Job.objects.values_list("status", flat=True)) == [Job.Status.QUEUED]


@pytest.mark.parametrize("action", ACTIONS)
def test_anonymous_is_sent_to_sign_in(client, job, action):
    response = client.post(f"/jobs/{job.pk}/{action}")
    assert response.status_code == 302 and response.url == f"/login/?next=/jobs/{job.pk}/{action}"
    assert list(Job.objects.values_list("status", flat=True)) == [Job.Status.QUEUED]


@pytest.mark.parametrize("who", ["owner", "staff"])
@pytest.mark.parametrize("action", CONTROLS)
def test_owner_or_staff_control_the_job(client, request, job, action, who):
    ready_for(job, action)
    client.force_login(request.getfixturevalue(who))
    assert client.post(f"/jobs/{job.pk}/{action}").status_code == 302
    assert status_of(job) == FROM_TO[action][1]


@pytest.mark.parametrize("action", CONTROLS)
def test_outsider_cannot_control_anothers_job(client, teammate, job, action):
    ready_for(job, action)
    client.force_login(teammate)
    assert client.post(f"/jobs/{job.pk}/{action}").status_code == 403
    assert status_of(job) == FROM_TO[action][0]
    assert job.items.count() == 3


def test_outsider_duplicates_a_job_as_their_own(client, teammate, job):
    client.force_login(teammate)
    response = client.post(f"/jobs/{job.pk}/duplicate")
    copy = Job.objects.exclude(pk=job.pk).get()
    assert copy.owner == teammate and response.url == f"/jobs/{copy.pk}/"
    assert copy.items.count() == 3 and status_of(job) == Job.Status.QUEUED


def test_resuming_a_cancelled_job_says_why_not(client, owner, job):
    Job.objects.filter(pk=job.pk).update(status=Job.Status.CANCELLED)
    client.force_login(owner)
    page = client.post(f"/jobs/{job.pk}/resume", follow=True).content.decode()
    assert "A cancelled job cannot be resumed." in page
    assert status_of(job) == Job.Status.CANCELLED


def test_action_on_an_unknown_job_is_404(client, owner):
    client.force_login(owner)
    assert client.post("/jobs/999/pause").status_code == 404


def test_unknown_action_is_404(client, owner, job):
    client.force_login(owner)
    assert client.post(f"/jobs/{job.pk}/explode").status_code == 404
