import pytest
from django.db import connection

from jobs.models import Endpoint, InvalidTransition, Job, ledger

pytestmark = pytest.mark.django_db


def bare_job(owner, **fields):
    """A job row without items: enough for the state diagram and the counters."""
    return Job.objects.create(owner=owner, name="j", url="/v1/chat/completions", **fields)


def test_transition_follows_the_state_diagram(owner):
    job = bare_job(owner)
    job.transition(Job.Status.RUNNING)
    job.transition(Job.Status.PAUSED, reason="You ran out of quota.")
    assert Job.objects.get(pk=job.pk).status_reason == "You ran out of quota."
    job.transition(Job.Status.RUNNING, reason="")
    job.transition(Job.Status.COMPLETED)
    assert job.finished_at is not None
    with pytest.raises(InvalidTransition, match="A completed job cannot become paused"):
        job.transition(Job.Status.PAUSED)


def test_transition_is_compare_and_set(owner):
    job = bare_job(owner)
    stale = Job.objects.get(pk=job.pk)
    job.transition(Job.Status.CANCELLED)
    with pytest.raises(InvalidTransition):
        stale.transition(Job.Status.RUNNING)  # the copy in memory says queued; the database says cancelled
    assert Job.objects.get(pk=job.pk).status == Job.Status.CANCELLED


def test_counts_added_through_the_ledger_lose_no_updates(owner, settings):
    settings.BATCHSITE_AUDIT_BOOKS = False  # counters with no items behind them
    job = bare_job(owner, total=10, n_pending=10)
    other = Job.objects.get(pk=job.pk)
    ledger.count(job.pk, n_pending=-3, n_succeeded=3, prompt_tokens=30)
    ledger.count(other.pk, n_pending=-2, n_failed=2)
    job.refresh_from_db()
    assert (job.n_pending, job.n_succeeded, job.n_failed, job.prompt_tokens) == (5, 3, 2, 30)
    assert job.progress() == 50.0


def test_api_key_encrypted_at_rest():
    endpoint = Endpoint(name="OpenAI", base_url="https://api.openai.com/v1")
    endpoint.set_api_key("sk-proj-verysecret1234")
    endpoint.save()
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key_encrypted, key_hint FROM jobs_endpoint")
        stored, hint = cursor.fetchone()
    assert "verysecret" not in stored and hint == "1234"
    assert Endpoint.objects.get().api_key == "sk-proj-verysecret1234"
    assert Endpoint.objects.get().masked_key == "…1234"


@pytest.fixture
def env_endpoint(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0000000000abcd")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("OPENAI_RPM", "3000")
    monkeypatch.delenv("OPENAI_TPM", raising=False)
    return Endpoint.default()


def test_default_endpoint_comes_from_the_environment(env_endpoint):
    assert env_endpoint.is_default and env_endpoint.from_env
    assert (env_endpoint.base_url, env_endpoint.api_key, env_endpoint.rpm, env_endpoint.tpm) == (
        "http://127.0.0.1:9/v1",
        "sk-test-0000000000abcd",
        3000,
        None,
    )


def test_a_rotated_environment_key_updates_the_same_endpoint(env_endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-rotated-key-9999")
    assert Endpoint.default().api_key == "sk-test-rotated-key-9999"
    assert Endpoint.objects.count() == 1


def test_only_one_default_endpoint():
    a = Endpoint.objects.create(name="a", base_url="http://a/v1", is_default=True)
    b = Endpoint.objects.create(name="b", base_url="http://b/v1")
    b.make_default()
    assert list(Endpoint.objects.filter(is_default=True)) == [b]
    a.refresh_from_db()
    assert not a.is_default


def test_sqlite_is_configured_for_concurrent_writers():
    if connection.vendor != "sqlite":
        pytest.skip("SQLite only")
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        assert cursor.fetchone()[0] == "wal"
        cursor.execute("PRAGMA busy_timeout")
        assert cursor.fetchone()[0] >= 5000
