"""Who sees and who changes a job: Job.can_view and Job.can_control, and the pages and /v1 that ask them.

Jobs are shared by the team: every active member sees every job; only its owner or staff change it. Through
/v1 a token sees the batches its user may change."""

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.factories import api_headers, chat_line, jsonl, make_endpoint, make_job

pytestmark = pytest.mark.django_db


@pytest.fixture
def job(owner, write):
    return make_job(write, owner, make_endpoint("http://127.0.0.1:9/v1"), 3, start=False)


@pytest.fixture
def inactive(django_user_model):
    return django_user_model.objects.create_user("gone", password="gone-pass-123", is_active=False)


def test_owner_views_and_controls_their_job(job, owner):
    assert job.can_view(owner) and job.can_control(owner)


def test_staff_views_and_controls_anyones_job(job, staff):
    assert job.can_view(staff) and job.can_control(staff)


def test_teammate_views_but_does_not_control_anothers_job(job, teammate):
    assert job.can_view(teammate) and not job.can_control(teammate)


def test_inactive_user_neither_views_nor_controls(job, inactive):
    assert not job.can_view(inactive) and not job.can_control(inactive)


def test_switched_off_owner_no_longer_controls_their_job(job, owner):
    owner.is_active = False
    assert not job.can_view(owner) and not job.can_control(owner)


def test_anonymous_neither_views_nor_controls(job):
    assert not job.can_view(AnonymousUser()) and not job.can_control(AnonymousUser())


def test_teammate_sees_anothers_job_page_without_its_controls(client, teammate, job):
    client.force_login(teammate)
    response = client.get(f"/jobs/{job.pk}/")
    assert response.status_code == 200 and f"/jobs/{job.pk}/pause" not in response.content.decode()


def test_owner_sees_the_controls_on_their_job_page(client, owner, job):
    client.force_login(owner)
    assert f"/jobs/{job.pk}/pause" in client.get(f"/jobs/{job.pk}/").content.decode()


def test_teammate_downloads_anothers_results(client, teammate, job):
    client.force_login(teammate)
    assert client.get(f"/jobs/{job.pk}/download/results").status_code == 200


def test_inactive_users_session_is_sent_to_sign_in(client, inactive, job):
    client.force_login(inactive)
    response = client.get(f"/jobs/{job.pk}/")
    assert response.status_code == 302 and response.url.startswith("/login/")


@pytest.fixture
def batch_id(client, owner, data_dir):
    make_endpoint("http://127.0.0.1:9/v1")
    headers = api_headers(owner)
    upload = {"file": SimpleUploadedFile("in.jsonl", jsonl([chat_line("a")])), "purpose": "batch"}
    file_id = client.post("/v1/files", upload, headers=headers).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    return client.post("/v1/batches", body, content_type="application/json", headers=headers).json()["id"]


@pytest.mark.parametrize("who, status", [("owner", 200), ("staff", 200), ("teammate", 404)])
def test_v1_shows_a_batch_to_whoever_may_control_its_job(client, batch_id, request, who, status):
    headers = api_headers(request.getfixturevalue(who))
    assert client.get(f"/v1/batches/{batch_id}", headers=headers).status_code == status


def test_v1_refuses_the_token_of_a_switched_off_owner(client, owner, batch_id):
    headers = api_headers(owner)
    owner.is_active = False
    owner.save(update_fields=["is_active"])
    assert client.get(f"/v1/batches/{batch_id}", headers=headers).status_code == 401


def test_v1_without_a_token_is_401(client, batch_id):
    assert client.get(f"/v1/batches/{batch_id}").status_code == 401
