import re

import pytest

from jobs import ingest
from tests.factories import chat_line

pytestmark = pytest.mark.django_db


def test_login_page_is_served(client):
    response = client.get("/login/")
    assert response.status_code == 200
    assert b"Sign in" in response.content


@pytest.mark.parametrize("url", ["/", "/jobs/1/", "/jobs/1/download/results"])
def test_pages_need_login(client, url):
    response = client.get(url)
    assert response.status_code == 302 and response.url.startswith("/login/")


@pytest.fixture
def job(owner, write):
    """A job whose name and request would run as HTML if a page did not escape them."""
    plan = ingest.validate(write("f.jsonl", [chat_line("<script>alert(1)</script>")]))
    return ingest.create_job(plan, owner=owner, name="<b>xss</b>")


def test_job_names_are_escaped_on_the_dashboard(client, teammate, job):
    client.force_login(teammate)
    home = client.get("/")
    assert b"&lt;b&gt;xss&lt;/b&gt;" in home.content and b"<b>xss</b>" not in home.content


def test_signed_in_teammate_opens_anothers_job(client, teammate, job):
    client.force_login(teammate)
    assert client.get(f"/jobs/{job.pk}/").status_code == 200


def test_csv_download_is_an_attachment_with_the_requests_as_written(client, teammate, job):
    client.force_login(teammate)
    download = client.get(f"/jobs/{job.pk}/download/csv")
    assert download.status_code == 200
    assert download["Content-Disposition"].startswith("attachment;")
    text = b"".join(download.streaming_content).decode()
    assert "<script>alert(1)</script>,,pending" in text


def test_unknown_download_kind_is_404(client, teammate, job):
    client.force_login(teammate)
    assert client.get(f"/jobs/{job.pk}/download/nope").status_code == 404


def test_unknown_job_is_404(client, teammate):
    client.force_login(teammate)
    assert client.get("/jobs/999/").status_code == 404


def _check(tmp_path, *args, **env):
    import os
    import subprocess
    import sys

    # A production process's environment: not the test run's (the browser tests allow async-unsafe ORM calls).
    base = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env = {**base, "BATCHSITE_DATA_DIR": str(tmp_path), "DEBUG": "0", "SECRET_KEY": "k" * 50, **env}
    return subprocess.run(
        [sys.executable, "manage.py", "check", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", ["SECRET_KEY", "ALLOWED_HOSTS"])
def test_production_settings_refuse_to_start_without(tmp_path, name):
    result = _check(tmp_path, **{name: ""})
    assert result.returncode != 0 and f"{name} must be set" in result.stderr


def test_production_settings_pass_the_deploy_check_behind_https(tmp_path):
    result = _check(
        tmp_path,
        "--deploy",
        ALLOWED_HOSTS="batchsite.example.com",
        SECURE_COOKIES="1",
        SECURE_PROXY_SSL_HEADER="1",
        SECRET_KEY="a-long-random-production-key-" + "x9Yq" * 10,
    )
    assert result.returncode == 0, result.stderr
    # Left to the operator, and said in the README: HSTS for subdomains and preload, redirecting at the proxy.
    found = set(re.findall(r"security\.W\d+", result.stdout + result.stderr))
    assert found <= {"security.W005", "security.W008", "security.W021"}, result.stdout + result.stderr


@pytest.mark.parametrize("debug", ["1", None])  # DEBUG on, said or by default
@pytest.mark.parametrize("bind", ["0.0.0.0:{port}", ":{port}", "[::]:{port}", "192.0.2.7:{port}"])
def test_the_web_server_will_not_listen_beyond_loopback_with_debug_on(tmp_path, bind, debug):
    """Issue 21: the deploy guide's Procfile bound 0.0.0.0 without DEBUG=0, so the network saw Django's
    debug pages. gunicorn (gunicorn.conf.py) now refuses before it opens a socket."""
    import os
    import subprocess
    import sys

    from tests.servers import ROOT, free_port

    env = {k: v for k, v in os.environ.items() if k != "DEBUG"} | {"BATCHSITE_DATA_DIR": str(tmp_path)}
    if debug is not None:
        env["DEBUG"] = debug
    address = bind.format(port=free_port())
    args = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind", address]
    result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and f"Refusing to listen on {address} with DEBUG on" in result.stderr
