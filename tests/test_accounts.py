"""Accounts: sign in and out, password change, and the staff Team page that creates and manages people."""

import re

import pytest

from jobs.models import ApiToken

pytestmark = pytest.mark.django_db


def test_sign_in_and_out(client, owner):
    response = client.post("/login/", {"username": "owner", "password": "owner-pass-123"})
    assert response.status_code == 302 and response.url == "/"
    assert client.get("/").status_code == 200
    assert client.get("/logout/").status_code == 405  # signing out is a POST (CSRF-protected), never a link
    client.post("/logout/")
    assert client.get("/").status_code == 302


def test_wrong_password_is_refused_with_a_message(client, owner):
    page = client.post("/login/", {"username": "owner", "password": "nope"}).content.decode()
    assert "correct username and password" in page


def test_password_change(client, owner):
    client.force_login(owner)
    response = client.post(
        "/account/password/",
        {
            "old_password": "owner-pass-123",
            "new_password1": "a-new-long-pass-42",
            "new_password2": "a-new-long-pass-42",
        },
    )
    assert response.status_code == 302
    owner.refresh_from_db()
    assert owner.check_password("a-new-long-pass-42")
    page = client.post(
        "/account/password/", {"old_password": "wrong", "new_password1": "x", "new_password2": "y"}
    ).content.decode()
    assert "incorrectly" in page


def test_staff_adds_a_person_who_can_then_sign_in(client, staff, django_user_model):
    client.force_login(staff)
    response = client.post("/team/", {"username": "carol", "email": "carol@example.com"})
    page = response.content.decode()
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    password = re.search(r"<code data-password>([^<]+)</code>", page).group(1)
    carol = django_user_model.objects.get(username="carol")
    assert not carol.is_staff and carol.check_password(password)
    assert client.get("/team/").content.decode().count(password) == 0  # shown once only
    client.logout()
    assert client.post("/login/", {"username": "carol", "password": password}).status_code == 302


def test_duplicate_username_is_a_form_error(client, staff, owner):
    client.force_login(staff)
    page = client.post("/team/", {"username": "owner"}).content.decode()
    assert "already exists" in page


def test_switched_off_person_loses_session_and_tokens(client, staff, owner):
    token, plaintext = ApiToken.create_for(owner, "script")
    other = client.__class__()
    other.force_login(owner)
    client.force_login(staff)
    client.post(f"/team/{owner.pk}/deactivate")
    assert other.get("/").status_code == 302  # signed out on the next request
    response = client.get("/v1/batches", HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    assert response.status_code == 401
    client.post(f"/team/{owner.pk}/activate")
    assert client.get("/v1/batches", HTTP_AUTHORIZATION=f"Bearer {plaintext}").status_code == 200


def test_staff_resets_a_persons_password(client, staff, owner):
    client.force_login(staff)
    page = client.post(f"/team/{owner.pk}/reset").content.decode()
    password = re.search(r"<code data-password>([^<]+)</code>", page).group(1)
    owner.refresh_from_db()
    assert owner.check_password(password) and not owner.check_password("owner-pass-123")


def test_staff_makes_a_person_staff_and_back(client, staff, owner):
    client.force_login(staff)
    client.post(f"/team/{owner.pk}/make-staff")
    owner.refresh_from_db()
    assert owner.is_staff
    client.post(f"/team/{owner.pk}/remove-staff")
    owner.refresh_from_db()
    assert not owner.is_staff


def test_staff_cannot_lock_themselves_out(client, staff):
    client.force_login(staff)
    page = client.post(f"/team/{staff.pk}/deactivate", follow=True).content.decode()
    assert "cannot switch off or demote your own account" in page
    staff.refresh_from_db()
    assert staff.is_active


def test_members_cannot_manage_the_team(client, owner, teammate):
    client.force_login(owner)
    assert client.get("/team/").status_code == 403
    assert client.post("/team/", {"username": "mallory"}).status_code == 403
    assert client.post(f"/team/{teammate.pk}/make-staff").status_code == 403
    teammate.refresh_from_db()
    assert not teammate.is_staff


def test_password_change_shows_the_rules_then_confirms(client, owner):
    client.force_login(owner)
    assert "at least 8 characters" in client.get("/account/password/").content.decode()
    response = client.post(
        "/account/password/",
        {
            "old_password": "owner-pass-123",
            "new_password1": "a-new-long-pass-42",
            "new_password2": "a-new-long-pass-42",
        },
        follow=True,
    )
    assert "Your password was changed." in response.content.decode()
    assert response.wsgi_request.user.is_authenticated  # the session survives the change
