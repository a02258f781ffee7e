"""Personal API tokens: the Bearer check on /v1, OpenAI's error shapes, the tokens page and command."""

import hashlib
import io

import pytest
from django.core.management import CommandError, call_command

from jobs.models import ApiToken
from tests.factories import api_headers

pytestmark = pytest.mark.django_db


def assert_openai_error(response, status: int, code=None) -> dict:
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and body["error"]["type"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize("url", ["/v1/files", "/v1/batches", "/v1/batches/batch_123", "/v1/files/file-1/content"])
def test_missing_token_gets_openai_401(client, url):
    error = assert_openai_error(client.get(url), 401)
    assert "Authorization: Bearer" in error["message"]


def test_wrong_token_gets_invalid_api_key(client, owner):
    api_headers(owner)
    error = assert_openai_error(
        client.get("/v1/batches", headers={"Authorization": "Bearer bs-nope-1234567890"}), 401, "invalid_api_key"
    )
    assert "bs-nope-1234567890" not in error["message"]  # masked, as OpenAI does
    assert_openai_error(client.get("/v1/batches", headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401)


def test_revoked_token_gets_401_and_others_keep_working(client, owner):
    token, plaintext = ApiToken.create_for(owner, "laptop")
    other = api_headers(owner)
    headers = {"Authorization": f"Bearer {plaintext}"}
    assert client.get("/v1/batches", headers=headers).status_code == 200
    token.revoke()
    error = assert_openai_error(client.get("/v1/batches", headers=headers), 401, "invalid_api_key")
    assert "revoked" in error["message"]
    assert client.get("/v1/batches", headers=other).status_code == 200


def test_deactivated_user_gets_401(client, owner):
    headers = api_headers(owner)
    owner.is_active = False
    owner.save()
    assert_openai_error(client.get("/v1/batches", headers=headers), 401, "invalid_api_key")


def test_token_is_stored_hashed_and_records_last_use(client, owner):
    token, plaintext = ApiToken.create_for(owner, "ci")
    assert plaintext.startswith("bs-") and len(plaintext) > 40
    assert token.token_hash == hashlib.sha256(plaintext.encode()).hexdigest()
    assert token.prefix == plaintext[:10] and plaintext not in str(
        ApiToken.objects.filter(pk=token.pk).values().first()
    )
    assert token.last_used_at is None
    client.get("/v1/batches", headers={"Authorization": f"Bearer {plaintext}"})
    token.refresh_from_db()
    assert token.last_used_at is not None


def test_session_login_is_not_enough_for_the_api(client, owner):
    client.force_login(owner)
    assert_openai_error(client.get("/v1/batches"), 401)


def test_unknown_path_is_openai_404_json(client, owner):
    error = assert_openai_error(client.get("/v1/models/nope", headers=api_headers(owner)), 404)
    assert "Invalid URL (GET /v1/models/nope)" == error["message"]
    assert_openai_error(client.post("/v1/nothing/here/", {}), 404)


@pytest.mark.parametrize(
    "method, url",
    [
        ("delete", "/v1/batches"),
        ("put", "/v1/files"),
        ("delete", "/v1/batches/batch_1"),
        ("get", "/v1/batches/batch_1/cancel"),
        ("post", "/v1/files/file-1/content"),
        ("post", "/v1/files/file-1"),
    ],
)
def test_wrong_method_is_openai_405(client, owner, method, url):
    response = getattr(client, method)(url, headers=api_headers(owner))
    assert_openai_error(response, 405, "method_not_allowed")
    assert response["Allow"]


def test_tokens_page_needs_login(client):
    response = client.get("/account/tokens/")
    assert response.status_code == 302 and response.url.startswith("/login/")


def test_tokens_page_shows_a_new_token_once_then_revokes_it(client, owner):
    client.force_login(owner)
    response = client.post("/account/tokens/", {"action": "create", "name": "eval <script>"})
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    page = response.content.decode()
    token = ApiToken.objects.get(user=owner)
    plaintext = page.split('<pre class="code" data-token>')[1].split("</pre>")[0]
    assert plaintext.startswith("bs-") and ApiToken.digest(plaintext) == token.token_hash
    assert "eval &lt;script&gt;" in page and "http://testserver/v1" in page
    assert client.get("/v1/batches", headers={"Authorization": f"Bearer {plaintext}"}).status_code == 200

    listing = client.get("/account/tokens/").content.decode()
    assert plaintext not in listing and token.prefix in listing and "active" in listing

    response = client.post("/account/tokens/", {"action": "revoke", "token": token.pk})
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert "revoked" in client.get("/account/tokens/").content.decode()
    assert client.get("/v1/batches", headers={"Authorization": f"Bearer {plaintext}"}).status_code == 401


def test_cannot_revoke_a_teammates_token(client, owner, teammate):
    token, _ = ApiToken.create_for(teammate, "theirs")
    client.force_login(owner)
    assert client.post("/account/tokens/", {"action": "revoke", "token": token.pk}).status_code == 404
    assert client.post("/account/tokens/", {"action": "revoke", "token": "x"}).status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None
    assert "theirs" not in client.get("/account/tokens/").content.decode()


def test_tokens_page_needs_csrf(owner):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)
    assert client.post("/account/tokens/", {"action": "create", "name": "x"}).status_code == 403
    assert not ApiToken.objects.exists()


def test_create_api_token_command(django_user_model, client):
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="--create-user"):
        call_command("create_api_token", "robot", stdout=out, stderr=err)
    call_command("create_api_token", "robot", "--create-user", stdout=out, stderr=err)
    plaintext = out.getvalue().strip().splitlines()[-1]
    user = django_user_model.objects.get(username="robot")
    assert not user.has_usable_password()
    assert ApiToken.authenticate(plaintext).user == user
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {plaintext}"}).status_code == 200
    call_command("create_api_token", "robot", stdout=out, stderr=err)  # a second token for the same user
    assert ApiToken.objects.filter(user=user).count() == 2


def test_oversized_body_is_a_400_in_openai_shape(client, owner, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = client.post(
        "/v1/batches", {"metadata": {"x": "y" * 2000}}, content_type="application/json", headers=api_headers(owner)
    )
    assert_openai_error(response, 400)


def test_an_unexpected_error_is_a_500_in_openai_shape(client, owner, monkeypatch, caplog):
    from jobs.api import batches

    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(batches, "cursor_page", boom)
    error = assert_openai_error(client.get("/v1/batches", headers=api_headers(owner)), 500)
    assert error["type"] == "server_error" and "bug" not in error["message"]
    assert "API error on GET /v1/batches" in caplog.text
