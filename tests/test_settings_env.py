"""Boolean environment variables are read strictly: a typo stops the start instead of quietly meaning off."""

import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parent.parent
SETUP = "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'batchsite.settings'); django.setup()\n"
SHOW = "from django.conf import settings as s; print(s.DEBUG, s.SESSION_COOKIE_SECURE, s.BATCHSITE_DEMO_USER)"


def _start(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Load the settings in a fresh process with only `env` set (none of the test run's); print a few booleans."""
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    env = {**base, "BATCHSITE_DATA_DIR": str(tmp_path), **env}
    return subprocess.run(
        [sys.executable, "-c", SETUP + SHOW], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "name",
    ["DEBUG", "SECURE_COOKIES", "SECURE_PROXY_SSL_HEADER", "BATCHSITE_ALLOW_PRIVATE_ENDPOINTS", "BATCHSITE_DEMO_USER"],
)
def test_a_misspelt_boolean_stops_the_start_naming_the_variable_and_the_accepted_values(tmp_path, name):
    result = _start(tmp_path, **{name: "ture"})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert f"{name}='ture'" in result.stderr
    assert "1/0, true/false, yes/no or on/off" in result.stderr


def test_ssl_redirect_is_read_strictly_too(tmp_path):
    result = _start(tmp_path, SECURE_COOKIES="1", SECURE_SSL_REDIRECT="maybe")
    assert result.returncode != 0 and "SECURE_SSL_REDIRECT='maybe'" in result.stderr


def test_booleans_accept_1_0_true_false_yes_no_on_off_in_any_case(tmp_path):
    result = _start(tmp_path, DEBUG="yes", SECURE_COOKIES=" On ", BATCHSITE_DEMO_USER="FALSE")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "False"]
    production = {"SECRET_KEY": "k" * 50, "ALLOWED_HOSTS": "batchsite.example.com"}
    result = _start(tmp_path, DEBUG="Off", SECURE_COOKIES="0", BATCHSITE_DEMO_USER="1", **production)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "True"]


def test_an_empty_boolean_means_its_default(tmp_path):
    result = _start(tmp_path, DEBUG="", SECURE_COOKIES="", BATCHSITE_DEMO_USER="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "True"]


def test_demo_login_is_not_made_when_switched_off(settings):
    settings.BATCHSITE_DEMO_USER = False
    out = StringIO()
    call_command("ensure_demo_user", stdout=out)
    assert "disabled" in out.getvalue()


@pytest.mark.django_db
def test_the_demo_login_is_made_once_and_never_promoted_or_taken_over_again(settings, tmp_path, django_user_model):
    settings.BATCHSITE_DEMO_USER, settings.DATA_DIR = True, tmp_path
    out = StringIO()
    call_command("ensure_demo_user", stdout=out)
    password = (tmp_path / "demo-password").read_text()
    demo = django_user_model.objects.get(username="demo")
    assert demo.is_superuser and demo.check_password(password) and f"demo / {password}" in out.getvalue()

    django_user_model.objects.filter(pk=demo.pk).update(is_staff=False, is_superuser=False)  # demoted by staff
    call_command("ensure_demo_user", stdout=StringIO())  # the next make run
    demo.refresh_from_db()
    assert not demo.is_staff and not demo.is_superuser

    (tmp_path / "demo-password").unlink()  # a new data dir, the same database: the account is someone's now
    demo.set_password("their-own-pass-123")
    demo.save()
    out = StringIO()
    call_command("ensure_demo_user", stdout=out)
    demo.refresh_from_db()
    assert demo.check_password("their-own-pass-123") and not demo.is_superuser
    assert "exists already" in out.getvalue() and not (tmp_path / "demo-password").exists()
