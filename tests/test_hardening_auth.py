"""Attacks on accounts, endpoint keys, sign-in and secrets on disk, each made over HTTP, and the safe answer:
staff cannot take over an admin, endpoint keys cannot be sent elsewhere, guessing is locked out, secrets
are private files from the start, and the pages carry a Content Security Policy."""

import os
import re
import stat
import subprocess
import sys
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from axes.models import AccessAttempt
from django.utils import timezone
from django_q.models import Schedule

from jobs import egress
from jobs.models import ApiToken, Endpoint
from jobs.secretfile import read_or_create
from tests.factories import api_headers, make_endpoint

pytestmark = pytest.mark.django_db
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def admin(django_user_model):
    return django_user_model.objects.create_superuser("root", password="root-pass-123")


class Recorder(BaseHTTPRequestHandler):
    """A server someone else controls: records what it is sent, answers with `reply` (status, body)."""

    def do_GET(self):
        self.server.seen.append(dict(self.headers))
        status, body = self.server.reply
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def foreign_server():
    servers = []

    def start(status=200, body=b'{"data": []}'):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        server.seen, server.reply = [], (status, body)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_port}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# 2. Staff cannot take over an admin


@pytest.mark.parametrize("action", ["reset", "deactivate", "remove-staff", "make-staff", "activate"])
def test_staff_cannot_act_on_an_admin(client, staff, admin, action):
    client.force_login(staff)
    before = (admin.password, admin.is_active, admin.is_staff, admin.is_superuser)
    response = client.post(f"/team/{admin.pk}/{action}")
    assert response.status_code == 403
    assert "root-pass" not in response.content.decode() and "data-password" not in response.content.decode()
    admin.refresh_from_db()
    assert (admin.password, admin.is_active, admin.is_staff, admin.is_superuser) == before
    assert client.post("/login/", {"username": "root", "password": "root-pass-123"}).status_code == 302


def test_team_page_offers_staff_no_buttons_on_an_admin_row(client, staff, admin):
    client.force_login(staff)
    page = client.get("/team/").content.decode()
    assert f"/team/{admin.pk}/" not in page and "Only an admin can change an admin." in page


def test_admin_may_reset_another_admin(client, admin, django_user_model):
    other = django_user_model.objects.create_superuser("root2", password="root2-pass-123")
    client.force_login(admin)
    page = client.post(f"/team/{other.pk}/reset").content.decode()
    password = re.search(r"<code data-password>([^<]+)</code>", page).group(1)
    other.refresh_from_db()
    assert other.check_password(password)


def test_password_reset_signs_the_person_out(client, staff, owner):
    theirs = client.__class__()
    theirs.force_login(owner)
    assert theirs.get("/").status_code == 200
    client.force_login(staff)
    client.post(f"/team/{owner.pk}/reset")
    assert theirs.get("/").status_code == 302


def test_password_reset_keeps_the_resetters_session(client, staff, owner):
    client.force_login(staff)
    client.post(f"/team/{owner.pk}/reset")
    assert client.get("/team/").status_code == 200


def test_password_reset_keeps_the_persons_api_tokens(client, staff, owner):
    """A reset replaces a forgotten password; switching the person off is what stops their tokens."""
    _, plaintext = ApiToken.create_for(owner, "script")
    client.force_login(staff)
    client.post(f"/team/{owner.pk}/reset")
    assert client.get("/v1/batches", HTTP_AUTHORIZATION=f"Bearer {plaintext}").status_code == 200


def test_resetting_ones_own_password_keeps_the_session(client, staff):
    client.force_login(staff)
    client.post(f"/team/{staff.pk}/reset")
    assert client.get("/team/").status_code == 200


@pytest.fixture
def sweeper():
    return Schedule.objects.create(
        name="sweeper", func="jobs.engine.tasks.sweep", schedule_type=Schedule.MINUTES, minutes=1
    )


def test_admin_shows_the_django_q_schedules(client, admin, sweeper):
    client.force_login(admin)
    assert client.get("/admin/django_q/schedule/").status_code == 200


def test_admin_cannot_open_the_add_schedule_page(client, admin):
    client.force_login(admin)
    assert client.get("/admin/django_q/schedule/add/").status_code == 403


def test_admin_cannot_add_a_schedule_that_runs_any_function(client, admin):
    client.force_login(admin)
    response = client.post(
        "/admin/django_q/schedule/add/",
        {"name": "pwn", "func": "os.system", "args": "'id'", "schedule_type": "O", "repeats": "-1"},
    )
    assert response.status_code == 403 and not Schedule.objects.filter(func="os.system").exists()


def test_admin_cannot_change_a_schedules_function(client, admin, sweeper):
    client.force_login(admin)
    client.post(
        f"/admin/django_q/schedule/{sweeper.pk}/change/",
        {"name": "sweeper", "func": "os.system", "schedule_type": "I"},
    )
    assert Schedule.objects.get(pk=sweeper.pk).func == "jobs.engine.tasks.sweep"


def test_endpoints_are_not_edited_in_the_admin(client, admin, foreign_server):
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    client.force_login(admin)
    _, url = foreign_server()
    client.post(
        f"/admin/jobs/endpoint/{endpoint.pk}/change/", {"name": endpoint.name, "base_url": url, "concurrency": 1}
    )
    assert Endpoint.objects.get(pk=endpoint.pk).base_url == "http://127.0.0.1:9/v1"


# 3. Endpoint keys go only where they were entered for; no requests to metadata services


def test_changing_the_server_needs_the_key_again(client, staff, foreign_server):
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    attacker, url = foreign_server()
    client.force_login(staff)
    response = client.post(f"/endpoints/{endpoint.pk}/", {"name": endpoint.name, "base_url": url, "concurrency": 5})
    assert response.status_code == 200 and "enter the API key again" in response.content.decode()
    assert Endpoint.objects.get(pk=endpoint.pk).base_url == "http://127.0.0.1:9/v1"
    client.post(f"/endpoints/{endpoint.pk}/test")
    assert not any("sk-test-simulator-key" in str(h) for h in attacker.seen)


def test_a_new_path_on_the_same_server_keeps_the_key(client, staff):
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    client.force_login(staff)
    client.post(
        f"/endpoints/{endpoint.pk}/",
        {"name": endpoint.name, "base_url": "http://127.0.0.1:9/openai/v1", "concurrency": 5},
    )
    assert Endpoint.objects.get(pk=endpoint.pk).api_key == "sk-test-simulator-key"


def test_a_new_server_with_its_own_key_is_saved(client, staff, foreign_server):
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    _, url = foreign_server()
    client.force_login(staff)
    client.post(
        f"/endpoints/{endpoint.pk}/",
        {"name": endpoint.name, "base_url": url, "concurrency": 5, "api_key": "sk-their-own-key-1"},
    )
    assert Endpoint.objects.get(pk=endpoint.pk).api_key == "sk-their-own-key-1"


@pytest.mark.parametrize("base_url", ["https://127.0.0.1:9/v1", "http://127.0.0.1:10/v1", "http://localhost:9/v1"])
def test_another_scheme_port_or_host_is_another_server(client, staff, base_url):
    endpoint = make_endpoint("http://127.0.0.1:9/v1")
    client.force_login(staff)
    response = client.post(
        f"/endpoints/{endpoint.pk}/", {"name": endpoint.name, "base_url": base_url, "concurrency": 5}
    )
    assert "enter the API key again" in response.content.decode()


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1:9/v1?x=",
        "http://127.0.0.1:9/v1#frag",
        "http://user:pw@127.0.0.1:9/v1",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/v1",
        "http://[fd00:ec2::254]/v1",
        "http://metadata.google.internal/computeMetadata/v1",
        "http://2852039166/v1",
        "http://[::ffff:169.254.169.254]/v1",
        "http://[::a9fe:a9fe]/v1",  # IPv4-compatible
        "http://[64:ff9b::a9fe:a9fe]/v1",  # NAT64
        "http://[2002:a9fe:a9fe::1]/v1",  # 6to4
        "http://127.0.0.1:99999/v1",
        "http://[::1/v1",
        "ftp://127.0.0.1/v1",
    ],
)
def test_unsafe_base_urls_are_form_errors(client, staff, base_url):
    client.force_login(staff)
    response = client.post(
        "/endpoints/new/", {"name": "x", "base_url": base_url, "concurrency": 5, "api_key": "sk-abc-123456789"}
    )
    assert response.status_code == 200 and 'class="field-error"' in response.content.decode()
    assert not Endpoint.objects.filter(name="x").exists()


def test_loopback_and_lan_servers_stay_allowed_and_metadata_can_be_allowed(client, staff, settings):
    client.force_login(staff)
    for i, url in enumerate(
        ["http://127.0.0.1:11434/v1", "http://[::1]:8000/v1", "http://10.1.2.3/v1", "http://localhost:8100/v1"]
    ):
        assert (
            client.post("/endpoints/new/", {"name": f"ok{i}", "base_url": url, "concurrency": 5}).status_code == 302
        ), url
    settings.BATCHSITE_ALLOW_PRIVATE_ENDPOINTS = True
    assert (
        client.post(
            "/endpoints/new/", {"name": "lab", "base_url": "http://169.254.10.10/v1", "concurrency": 5}
        ).status_code
        == 302
    )


def test_test_connection_checks_the_address_again_when_it_is_used(client, staff, foreign_server, monkeypatch):
    """DNS rebinding: the name resolved to an allowed address when saved, to a metadata address now."""
    server, url = foreign_server(body=b'{"data": [{"id": "CANARY-model"}]}')
    endpoint = make_endpoint(url.replace("127.0.0.1", "localhost"))
    client.force_login(staff)
    assert "CANARY-model" in client.post(f"/endpoints/{endpoint.pk}/test").content.decode()
    asked = len(server.seen)  # the models, then the Batch API
    monkeypatch.setattr(egress, "resolve_host", lambda host: ["169.254.169.254"])
    text = client.post(f"/endpoints/{endpoint.pk}/test").content.decode()
    assert "link-local or cloud metadata" in text and "CANARY" not in text
    assert len(server.seen) == asked  # nothing sent the second time
    # and the connection goes to the address that was checked, not to one the name leads to later
    monkeypatch.setattr(egress, "resolve_host", lambda host: ["192.0.2.1"])  # TEST-NET-1: allowed, unreachable
    text = client.post(f"/endpoints/{endpoint.pk}/test").content.decode()
    assert "Could not reach" in text and "CANARY" not in text
    assert len(server.seen) == asked


def test_test_connection_never_shows_a_foreign_body(client, staff, foreign_server):
    _, url = foreign_server(status=500, body=b'{"secret": "INTERNAL-DATA"}')
    endpoint = make_endpoint(url)
    client.force_login(staff)
    text = client.post(f"/endpoints/{endpoint.pk}/test").content.decode()
    assert "HTTP 500" in text and "INTERNAL-DATA" not in text


@pytest.mark.parametrize("stored", ["http://127.0.0.1:99999/v1", "http://[::1/v1", "http://127.0.0.1:9/v1?x=1"])
def test_a_bad_stored_url_is_a_message_not_a_500(client, staff, stored):
    endpoint = Endpoint.objects.create(name="old", base_url=stored)  # saved before these checks existed
    client.force_login(staff)
    response = client.post(f"/endpoints/{endpoint.pk}/test")
    assert response.status_code == 200 and "flash-error" in response.content.decode()


def test_the_environments_endpoint_is_read_only(client, staff, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-123456")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    endpoint = Endpoint.default()
    client.force_login(staff)
    page = client.get(f"/endpoints/{endpoint.pk}/").content.decode()
    assert "disabled" in page and ">Save<" not in page and "OPENAI_BASE_URL" in page
    response = client.post(
        f"/endpoints/{endpoint.pk}/",
        {"name": "mine", "base_url": "http://127.0.0.1:10/v1", "concurrency": 1, "api_key": "sk-other-1234567"},
    )
    assert response.status_code == 403
    endpoint.refresh_from_db()
    assert (endpoint.name, endpoint.base_url, endpoint.api_key) == (
        Endpoint.ENV_NAME,
        "http://127.0.0.1:9/v1",
        "sk-from-env-123456",
    )


def test_key_fields_are_hidden_from_error_reports(client, staff):
    client.force_login(staff)
    response = client.post(
        "/endpoints/new/",
        {"name": "x", "base_url": "http://127.0.0.1:9/v1", "concurrency": 5, "api_key": "sk-a-b-c-1234"},
    )
    assert response.wsgi_request.sensitive_post_parameters == ("api_key",)


# 6. Password and token guessing


def _fail(client, username, ip, n, url="/login/"):
    for _ in range(n):  # the ordinary "wrong password" page, then at the limit the lockout page
        response = client.post(url, {"username": username, "password": "wrong-guess"}, REMOTE_ADDR=ip)
        assert response.status_code in (200, 429)


def test_sign_in_locks_out_a_username_guessed_from_many_addresses(client, owner, teammate, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for i in range(3):
        _fail(client, "owner", f"10.0.0.{i}", 1)
    response = client.post("/login/", {"username": "owner", "password": "owner-pass-123"}, REMOTE_ADDR="10.0.0.99")
    page = response.content.decode()
    assert response.status_code == 429 and "Sign-in paused" in page and "15 minutes" in page
    assert int(response["Retry-After"]) == 15 * 60
    assert "_auth_user_id" not in client.session
    # others still sign in from there
    assert (
        client.post(
            "/login/", {"username": "teammate", "password": "teammate-pass-123"}, REMOTE_ADDR="10.0.0.99"
        ).status_code
        == 302
    )


def test_sign_in_locks_out_an_address_guessing_many_usernames(client, owner, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for name in ("alice", "bob", "carol"):
        _fail(client, name, "10.9.9.9", 1)
    response = client.post("/login/", {"username": "owner", "password": "owner-pass-123"}, REMOTE_ADDR="10.9.9.9")
    assert response.status_code == 429
    assert (
        client.post("/login/", {"username": "owner", "password": "owner-pass-123"}, REMOTE_ADDR="10.9.9.10").status_code
        == 302
    )


def test_lockout_ends_after_the_cooling_period(client, owner, settings):
    settings.AXES_FAILURE_LIMIT = 3
    _fail(client, "owner", "10.0.0.1", 3)
    assert (
        client.post("/login/", {"username": "owner", "password": "owner-pass-123"}, REMOTE_ADDR="10.0.0.1").status_code
        == 429
    )
    AccessAttempt.objects.update(attempt_time=timezone.now() - timedelta(minutes=16))  # time passes
    assert (
        client.post("/login/", {"username": "owner", "password": "owner-pass-123"}, REMOTE_ADDR="10.0.0.1").status_code
        == 302
    )


def test_admin_sign_in_is_locked_out_too(client, admin, settings):
    settings.AXES_FAILURE_LIMIT = 3
    _fail(client, "root", "10.0.0.7", 3, url="/admin/login/")
    response = client.post("/admin/login/", {"username": "root", "password": "root-pass-123"}, REMOTE_ADDR="10.0.0.7")
    assert response.status_code == 429 and "Sign-in paused" in response.content.decode()


@pytest.fixture
def guessed_from(client, settings):
    """An address that sent as many wrong API tokens as the limit allows."""
    settings.AXES_FAILURE_LIMIT = 3
    for i in range(3):
        response = client.get(
            "/v1/batches", headers={"Authorization": f"Bearer bs-guess-{i:020d}"}, REMOTE_ADDR="10.5.5.5"
        )
        assert response.status_code == 401
    return "10.5.5.5"


def test_wrong_api_tokens_are_rate_limited_per_address(client, guessed_from):
    response = client.get("/v1/batches", headers={"Authorization": "Bearer bs-guess-x"}, REMOTE_ADDR=guessed_from)
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limit_exceeded"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert int(response["Retry-After"]) == 15 * 60


def test_a_real_token_still_works_from_a_rate_limited_address(client, owner, guessed_from):
    """256 random bits are not guessed."""
    assert client.get("/v1/batches", headers=api_headers(owner), REMOTE_ADDR=guessed_from).status_code == 200


def test_token_guesses_do_not_limit_other_addresses(client, guessed_from):
    response = client.get("/v1/batches", headers={"Authorization": "Bearer bs-typo"}, REMOTE_ADDR="10.5.5.6")
    assert response.status_code == 401


def test_token_guesses_pause_the_addresses_sign_in_too(client, owner, guessed_from):
    """One count for all guessing."""
    response = client.post("/login/", {"username": "owner", "password": "owner-pass-123"}, REMOTE_ADDR=guessed_from)
    assert response.status_code == 429


def test_a_wrong_token_upload_is_not_read(client, settings):
    settings.AXES_FAILURE_LIMIT = 3
    response = client.post(
        "/v1/files", {"purpose": "batch", "file": ("x.jsonl", b"{}\n")}, headers={"Authorization": "Bearer bs-nope"}
    )
    assert response.status_code == 401
    assert AccessAttempt.objects.get().post_data == ""  # recorded by address, body untouched


def test_forwarded_address_is_trusted_only_from_the_proxy(client, owner, settings):
    settings.AXES_FAILURE_LIMIT = 2
    settings.FORWARDED_ALLOW_IPS = ["127.0.0.1"]
    _fail(client, "nobody1", "127.0.0.1", 1)
    client.post("/login/", {"username": "nobody2", "password": "x"}, HTTP_X_FORWARDED_FOR="203.0.113.5")
    attempts = set(AccessAttempt.objects.values_list("ip_address", flat=True))
    assert attempts == {"127.0.0.1", "203.0.113.5"}  # behind the proxy: the client's own address
    client.post(
        "/login/", {"username": "nobody3", "password": "x"}, REMOTE_ADDR="198.51.100.1", HTTP_X_FORWARDED_FOR="10.1.1.1"
    )
    assert AccessAttempt.objects.filter(ip_address="198.51.100.1").exists()  # not from the proxy: header ignored


def _settings_of(tmp_path, code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHSITE_", "SECRET_KEY"))}
    env = {
        **base,
        "BATCHSITE_DATA_DIR": str(tmp_path),
        "DEBUG": "1",
        "DJANGO_SETTINGS_MODULE": "batchsite.settings",
        **env,
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_lockout_thresholds_come_from_the_environment(tmp_path):
    code = "from django.conf import settings as s; print(s.AXES_FAILURE_LIMIT, s.AXES_COOLOFF_TIME.total_seconds())"
    assert _settings_of(tmp_path, code).split() == ["10", "900.0"]
    assert _settings_of(tmp_path, code, BATCHSITE_LOGIN_FAILURE_LIMIT="4", BATCHSITE_LOCKOUT_MINUTES="2").split() == [
        "4",
        "120.0",
    ]


# 9. Secrets on disk


# Run first in the processes below: whenever a file is opened or its mode changed, neither secret may be on disk
# readable by others (the old code wrote the file, then narrowed its mode).
WATCH = """
import os, sys
from pathlib import Path
data = Path(os.environ["BATCHSITE_DATA_DIR"])
def watch(event, args):
    if event in ("open", "os.chmod", "os.rename"):
        for name in ("secret_key", "demo-password"):
            try:
                st = os.stat(data / name)
            except OSError:
                continue
            if st.st_size and st.st_mode & 0o077:
                print("LEAK", name, oct(st.st_mode))
sys.addaudithook(watch)
"""


def test_secret_key_and_demo_password_are_private_from_the_start_even_with_umask_0(tmp_path):
    code = WATCH + (
        "os.umask(0); import django; django.setup(); from django.core.management import call_command\n"
        "call_command('migrate', verbosity=0); call_command('ensure_demo_user')"
    )
    first = _settings_of(tmp_path, code)
    assert "LEAK" not in first and "Demo login: demo / " in first
    for name in ("secret_key", "demo-password"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert _settings_of(tmp_path, code) == first  # the same key and password at the next start


def test_processes_starting_at_once_share_one_secret_key(tmp_path):
    # Everything but the settings is imported before the start signal, so the processes race for the file.
    code = (
        "import time, sys, hashlib; from pathlib import Path; import django.conf, django.db.models, csp.constants\n"
        "go = Path(sys.argv[1])\n"
        "while not go.exists(): time.sleep(0.0005)\n"
        "from django.conf import settings; print(hashlib.sha256(settings.SECRET_KEY.encode()).hexdigest())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHSITE_", "SECRET_KEY"))}
    env.update(BATCHSITE_DATA_DIR=str(tmp_path / "data"), DEBUG="1", DJANGO_SETTINGS_MODULE="batchsite.settings")
    (tmp_path / "data").mkdir()
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(go)], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    time.sleep(3)  # all started and waiting
    go.touch()
    keys = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert len(set(keys)) == 1 and keys[0], keys


def test_a_secret_file_is_0600_before_the_secret_is_in_it(tmp_path):
    path = tmp_path / "secret"
    modes = []

    def generate():
        modes.append(stat.S_IMODE(path.stat().st_mode))  # the file exists already, empty
        return "s3cret"

    old = os.umask(0)
    try:
        assert read_or_create(path, generate) == "s3cret"
    finally:
        os.umask(old)
    assert modes == [0o600] and read_or_create(path, lambda: "other") == "s3cret"


def test_a_planted_symlink_does_not_receive_the_secret(tmp_path):
    elsewhere = tmp_path / "readable-by-all"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "secret_key").symlink_to(elsewhere)
    with pytest.raises(OSError):
        read_or_create(tmp_path / "data" / "secret_key", lambda: "s3cret")
    assert not elsewhere.exists()


# 10. Content Security Policy


def test_pages_send_a_csp_without_inline_script(client, owner):
    client.force_login(owner)
    for url in ("/login/", "/", "/jobs/new/", "/account/tokens/"):
        policy = client.get(url)["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["script-src"] == "'self'", url
        assert "unsafe" not in directives["script-src"] and "unsafe" not in directives["default-src"]
        assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'"


def test_templates_hold_no_inline_script_or_handlers():
    for path in (ROOT / "templates").rglob("*.html"):
        text = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), path
        assert not re.search(r"\son[a-z]+\s*=", text), path
        assert "javascript:" not in text and "hx-on" not in text, path


def test_wrong_tokens_from_one_address_make_one_record_whatever_their_user_agent(client, settings):
    settings.AXES_FAILURE_LIMIT = 10
    for i in range(6):
        response = client.get(
            "/v1/batches",
            headers={"Authorization": f"Bearer bs-guess-{i}", "User-Agent": f"agent/{i}"},
            REMOTE_ADDR="10.6.6.6",
        )
        assert response.status_code == 401
    assert AccessAttempt.objects.filter(ip_address="10.6.6.6").count() == 1


def test_an_ipv6_guesser_is_counted_by_its_64_not_by_each_address(client, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for host in ("1", "2", "3"):
        response = client.get(
            "/v1/batches", headers={"Authorization": "Bearer bs-x"}, REMOTE_ADDR=f"2001:db8:1:2::{host}"
        )
        assert response.status_code == 401
    same_64 = client.get("/v1/batches", headers={"Authorization": "Bearer bs-x"}, REMOTE_ADDR="2001:db8:1:2:ffff::9")
    other_64 = client.get("/v1/batches", headers={"Authorization": "Bearer bs-x"}, REMOTE_ADDR="2001:db8:1:3::1")
    assert (same_64.status_code, other_64.status_code) == (429, 401)
    assert AccessAttempt.objects.count() == 2  # one record a /64
