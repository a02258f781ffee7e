"""Nobody can make the server store more than the limits allow: bodies are refused before they are read."""

from __future__ import annotations

import json
import socket
import time

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from jobs.models import File
from tests.factories import api_headers

BOUNDARY = "----batchsite-limit-test"


def _raw_post(port: int, path: str, headers: dict, body: bytes, timeout: float = 10) -> tuple[int, bytes, float]:
    """Send the headers and `body` (however much Content-Length claims), then read the answer: (status, body, seconds)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return int(head.split()[1]), rest, time.monotonic() - start


def _multipart_start(filename: str = "big.jsonl") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + b'{"custom_id": "x"}\n' * 5000


@pytest.mark.slow
def test_anonymous_huge_post_is_refused_before_anything_is_read_or_spooled(web_server, owner, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    server = web_server(TMPDIR=str(spool))  # where Django would spool a multipart file
    port = server.port
    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(2 * 1024**3),
        "Cookie": "csrftoken=" + "a" * 32,
    }  # a well-formed CSRF cookie: CSRF then reads the form

    # 2 GB claimed, 100 KB sent: a server that reads the body waits for the rest and never answers in time.
    status, body, seconds = _raw_post(port, "/login/", headers, _multipart_start())
    assert status == 413 and seconds < 5, (status, body)
    assert b"larger than this server accepts" in body
    assert list(spool.iterdir()) == []

    # /v1/files takes big uploads, but not bigger than BATCHSITE_MAX_UPLOAD_MB (512 MB): OpenAI's error shape.
    token = api_headers(owner)["Authorization"]
    status, body, seconds = _raw_post(port, "/v1/files", {**headers, "Authorization": token}, _multipart_start())
    assert status == 413 and seconds < 5, (status, body)
    assert json.loads(body)["error"]["code"] == "file_too_large"

    # Without a length Django would read an empty body; the client is told instead.
    chunked = {"Content-Type": headers["Content-Type"], "Transfer-Encoding": "chunked", "Authorization": token}
    status, body, _ = _raw_post(port, "/v1/files", chunked, b"10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n")
    assert status == 411 and json.loads(body)["error"]["code"] == "length_required"
    assert list(spool.iterdir()) == []
    assert not File.objects.exists()

    # A small anonymous post still reaches the page (CSRF refuses it), and a signed-in upload still works.
    status, _, _ = _raw_post(
        port,
        "/login/",
        {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "20"},
        b"username=a&password=",
    )
    assert status == 403


@pytest.mark.django_db
def test_upload_over_the_limit_stops_while_streaming_and_leaves_no_temp_file(client, owner, settings, tmp_path):
    """A body within the multipart allowance whose file passes BATCHSITE_MAX_UPLOAD_MB is cut off as it arrives."""
    spool = tmp_path / "spool"
    spool.mkdir()
    settings.DATA_DIR = tmp_path
    settings.BATCHSITE_MAX_UPLOAD_MB = 1
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 1000  # to disk from the first byte, as a big upload would go
    settings.FILE_UPLOAD_TEMP_DIR = str(spool)
    seen = []
    original = __import__("tempfile").NamedTemporaryFile

    def spying(*args, **kwargs):  # records the temporary files Django opens for the upload
        f = original(*args, **kwargs)
        seen.append(f.name)
        return f

    import django.core.files.uploadedfile as uploaded

    headers = api_headers(owner)
    content = b'{"custom_id": "x"}\n' * 80_000  # 1.5 MB
    uploaded.tempfile.NamedTemporaryFile = spying
    try:
        response = client.post(
            "/v1/files", {"purpose": "batch", "file": SimpleUploadedFile("big.jsonl", content)}, headers=headers
        )
    finally:
        uploaded.tempfile.NamedTemporaryFile = original
    assert response.status_code == 413, response.content
    assert response.json()["error"]["code"] == "file_too_large" and "1 MB" in response.json()["error"]["message"]
    assert seen and list(spool.iterdir()) == []  # spooled while it streamed, deleted when it stopped
    assert not File.objects.exists() and not (tmp_path / "uploads").exists()

    # The same upload through the dashboard gets the plain page.
    client.force_login(owner)
    response = client.post("/jobs/new/", {"file": SimpleUploadedFile("big.jsonl", content)})
    assert response.status_code == 413 and response["Content-Type"].startswith("text/plain")
    assert list(spool.iterdir()) == []

    # Under the limit, it is stored.
    response = client.post(
        "/v1/files", {"purpose": "batch", "file": SimpleUploadedFile("ok.jsonl", content[:500_000])}, headers=headers
    )
    assert response.status_code == 200, response.content
