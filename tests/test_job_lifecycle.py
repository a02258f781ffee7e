"""Deleting a job: every way of deleting takes the job's row lock first (the lock order, jobs/models/job.py),
and people (the dashboard, the admin) may delete only a job whose slices are not sending requests."""

import pytest
from django.db import connection

from jobs.models import Item, Job
from tests.factories import make_endpoint, make_job

pytestmark = pytest.mark.django_db


@pytest.fixture
def endpoint():
    return make_endpoint("http://127.0.0.1:9/v1")


@pytest.fixture
def jobs(owner, endpoint, write):
    return [make_job(write, owner, endpoint, 3, start=False) for _ in range(2)]


@pytest.fixture
def locks(monkeypatch):
    """Records each Job.lock: the job's id, whether a transaction was open beyond the test's own, and how many
    of the job's items were left."""
    seen = []
    real = Job.lock
    depth = len(connection.atomic_blocks)

    def spy(job_id):
        seen.append((job_id, len(connection.atomic_blocks) > depth, Item.objects.filter(job_id=job_id).count()))
        return real(job_id)

    monkeypatch.setattr(Job, "lock", staticmethod(spy))
    return seen


@pytest.fixture
def admin(django_user_model):
    return django_user_model.objects.create_superuser("root", password="root-pass-123")


def set_status(job: Job, status: str) -> Job:
    Job.objects.filter(pk=job.pk).update(status=status)
    job.refresh_from_db()
    return job


def test_queryset_delete_locks_each_job_before_its_items_go(jobs, locks):
    Job.objects.filter(pk__in=[j.pk for j in jobs]).delete()
    assert sorted(locks) == sorted((j.pk, True, 3) for j in jobs)
    assert not Job.objects.exists() and not Item.objects.exists()


def test_job_delete_locks_the_job_before_its_items_go(jobs, locks):
    deleted, kept = jobs
    deleted_pk = deleted.pk
    deleted.delete()
    assert locks == [(deleted_pk, True, 3)]
    assert set(Item.objects.values_list("job_id", flat=True)) == {kept.pk}


def test_deleting_a_user_locks_each_of_their_jobs_first(owner, jobs, locks):
    owner.delete()
    assert sorted(locks) == sorted((j.pk, True, 3) for j in jobs)
    assert not Job.objects.exists() and not Item.objects.exists()


@pytest.mark.parametrize("status", Job.Status.values)
def test_only_a_job_without_running_slices_is_deletable(jobs, status):
    job = set_status(jobs[0], status)
    assert job.deletable() == (status not in Job.ACTIVE)


def test_dashboard_refuses_to_delete_a_running_job(client, owner, jobs):
    job = set_status(jobs[0], Job.Status.RUNNING)
    client.force_login(owner)
    response = client.post(f"/jobs/{job.pk}/delete", follow=True)
    assert response.redirect_chain[-1][0] == f"/jobs/{job.pk}/"
    assert "Cancel or pause the job before deleting it." in response.content.decode()
    assert Job.objects.count() == 2 and job.items.count() == 3


def test_dashboard_deletes_a_paused_job(client, owner, jobs):
    job = set_status(jobs[0], Job.Status.PAUSED)
    client.force_login(owner)
    response = client.post(f"/jobs/{job.pk}/delete", follow=True)
    assert response.redirect_chain[-1][0] == "/"
    assert f"Deleted “{job.name}”." in response.content.decode()
    assert not Job.objects.filter(pk=job.pk).exists() and not Item.objects.filter(job_id=job.pk).exists()


@pytest.mark.parametrize("status", Job.ACTIVE)
def test_admin_delete_page_lists_an_active_job_as_protected(client, admin, jobs, status):
    job = set_status(jobs[0], status)
    client.force_login(admin)
    page = client.get(f"/admin/jobs/job/{job.pk}/delete/").content.decode()
    assert f"{job.name} ({status}: cancel or pause it first)" in page
    assert client.post(f"/admin/jobs/job/{job.pk}/delete/", {"post": "yes"}).status_code == 200
    assert Job.objects.filter(pk=job.pk).exists() and job.items.count() == 3


@pytest.mark.parametrize("status", Job.ACTIVE)
def test_admin_bulk_delete_keeps_an_active_job(client, admin, jobs, status):
    job = set_status(jobs[0], status)
    client.force_login(admin)
    selected = {"action": "delete_selected", "_selected_action": [j.pk for j in jobs], "post": "yes"}
    page = client.post("/admin/jobs/job/", selected).content.decode()
    assert f"{job.name} ({status}: cancel or pause it first)" in page
    assert Job.objects.count() == 2 and Item.objects.count() == 6


def test_admin_keeps_a_user_who_owns_an_active_job(client, admin, owner, jobs, django_user_model):
    job = set_status(jobs[0], Job.Status.RUNNING)
    client.force_login(admin)
    page = client.get(f"/admin/auth/user/{owner.pk}/delete/").content.decode()
    assert f"{job.name} (running: cancel or pause it first)" in page
    selected = {"action": "delete_selected", "_selected_action": [owner.pk], "post": "yes"}
    page = client.post("/admin/auth/user/", selected).content.decode()
    assert f"{job.name} (running: cancel or pause it first)" in page
    assert django_user_model.objects.filter(pk=owner.pk).exists()
    assert Job.objects.count() == 2 and Item.objects.count() == 6


@pytest.mark.parametrize("status", [Job.Status.PAUSED, *Job.FINISHED])
def test_admin_deletes_a_job_that_is_not_active(client, admin, jobs, locks, status):
    job = set_status(jobs[0], status)
    client.force_login(admin)
    assert client.post(f"/admin/jobs/job/{job.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not Job.objects.filter(pk=job.pk).exists() and not Item.objects.filter(job_id=job.pk).exists()
    assert locks == [(job.pk, True, 3)]


def test_admin_bulk_deletes_jobs_that_are_not_active(client, admin, jobs, locks):
    for job in jobs:
        set_status(job, Job.Status.COMPLETED)
    client.force_login(admin)
    selected = {"action": "delete_selected", "_selected_action": [j.pk for j in jobs], "post": "yes"}
    assert client.post("/admin/jobs/job/", selected).status_code == 302
    assert not Job.objects.exists() and not Item.objects.exists()
    assert sorted(job_id for job_id, *_ in locks) == sorted(j.pk for j in jobs)


def test_admin_deletes_a_user_whose_jobs_are_finished(client, admin, owner, jobs, locks):
    for job in jobs:
        set_status(job, Job.Status.CANCELLED)
    client.force_login(admin)
    selected = {"action": "delete_selected", "_selected_action": [owner.pk], "post": "yes"}
    assert client.post("/admin/auth/user/", selected).status_code == 302
    assert not Job.objects.exists() and not Item.objects.exists()
    assert sorted(job_id for job_id, *_ in locks) == sorted(j.pk for j in jobs)
