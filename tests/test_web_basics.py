
import pytest

from jobs import ingest
from tests.conftest import chat_line

pytestmark = pytest.mark.django_db


def test_login_page_is_served(client):
    response = client.get("/login/")
    assert response.status_code == 200
    assert b"Sign in" in response.content


@pytest.mark.parametrize("url", ["/", "/jobs/1/", "/jobs/1/download/results"])
def test_pages_need_login(client, url):
    response = client.get(url)
    assert response.status_code == 302 and response.url.startswith("/login/")


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["database"] == "ok"
    assert isinstance(response.json()["workers"], int)


def test_signed_in_teammate_sees_and_downloads_jobs(client, owner, teammate, write):
    job = ingest.create_job(ingest.validate(write("f.jsonl", [chat_line("<script>alert(1)</script>")])), owner=owner, name="<b>xss</b>")
    client.force_login(teammate)
    home = client.get("/")
    assert b"&lt;b&gt;xss&lt;/b&gt;" in home.content and b"<b>xss</b>" not in home.content
    assert client.get(f"/jobs/{job.pk}/").status_code == 200
    download = client.get(f"/jobs/{job.pk}/download/csv")
    assert download.status_code == 200
    assert download["Content-Disposition"].startswith("attachment;")
    text = b"".join(download.streaming_content).decode()
    assert "<script>alert(1)</script>,,pending" in text
    assert client.get(f"/jobs/{job.pk}/download/nope").status_code == 404
    assert client.get("/jobs/999/").status_code == 404
