"""A hostile upstream (issue 21): an endpoint that answers with a redirect to an internal address. No client
that talks to an endpoint follows it: the live engine fails the request as redirect_refused naming where it
pointed, the remote engine pauses the job saying so, and the internal server is never asked anything. And an
address written as IPv6 is checked as the IPv4 address it leads to."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address

import pytest

from jobs import egress, ingest
from jobs.engine import remote, upstream
from jobs.models import Item, Job
from tests.factories import chat_line, make_endpoint, make_job, seed_prices
from tests.test_runner_rules import slice_run

ANSWER = {
    "id": "chatcmpl-internal",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "AKIA-internal-secret"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


class Server:
    """A tiny HTTP server in a thread: `answer(handler)` answers every request; `hits` counts them."""

    def __init__(self, answer):
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                outer.hits += 1
                self.rfile.read(int(self.headers.get("content-length") or 0))
                answer(self)

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send_json(handler, status, body, headers=()):
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(data)))
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def internal_and_hostile():
    """(internal server that answers like OpenAI with a secret, hostile upstream that redirects every request there)"""
    internal = Server(lambda h: send_json(h, 200, ANSWER))
    target = f"{internal.url}/latest/meta-data/iam/security-credentials/"
    hostile = Server(lambda h: send_json(h, 302, {"moved": True}, [("location", target)]))
    yield internal, hostile
    hostile.close()
    internal.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_permanent_failure_that_names_where_it_pointed(status):
    error = upstream.classify(status, "", {"location": "http://169.254.169.254/latest/\nmeta-data"})

    assert (error.kind, error.code, error.http_status) == (upstream.PERMANENT, "redirect_refused", status)
    assert "pointed to http://169.254.169.254/latest/ meta-data" in error.message  # on one line
    assert "does not follow redirects" in error.message


@pytest.mark.django_db(transaction=True)
def test_the_live_engine_never_follows_a_redirect(internal_and_hostile, write, owner, monkeypatch):
    internal, hostile = internal_and_hostile
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    job = make_job(write, owner, make_endpoint(f"{hostile.url}/v1", concurrency=4), 5, start=False)

    slice_run(job, budget=5.0)

    assert internal.hits == 0 and hostile.hits == 5  # each request asked once, not retried
    items = list(job.items.all())
    assert {(i.status, i.error_code, i.attempts, i.http_status) for i in items} == {
        (Item.Status.FAILED, "redirect_refused", 1, 302)
    }
    assert all("/latest/meta-data/iam/" in i.error_message and "AKIA" not in i.response for i in items)


@pytest.mark.django_db
def test_the_remote_engine_never_follows_a_redirect(internal_and_hostile, write, owner, monkeypatch):
    internal, hostile = internal_and_hostile
    monkeypatch.setattr("jobs.queue.async_task", lambda *a, **k: None)
    seed_prices()
    plan = ingest.validate(write("r.jsonl", [chat_line(f"r{i}", "hi") for i in range(3)]))
    endpoint = make_endpoint(f"{hostile.url}/v1")
    job = ingest.create_job(plan, owner=owner, endpoint=endpoint, options=ingest.RunOptions(mode=Job.Mode.REMOTE))
    job.start()

    remote.poll_round()

    job.refresh_from_db()
    assert internal.hits == 0 and hostile.hits >= 1
    assert job.status == Job.Status.PAUSED and "does not follow redirects" in job.status_reason
    assert "/latest/meta-data/iam/" in job.status_reason
    assert job.n_succeeded == 0


@pytest.mark.parametrize(
    "address, ipv4",
    [
        ("::ffff:169.254.169.254", "169.254.169.254"),
        ("::a9fe:a9fe", "169.254.169.254"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        ("2002:a9fe:a9fe::1", "169.254.169.254"),
        ("2001:0:4136:e378:8000:63bf:5601:5601", "169.254.169.254"),  # Teredo: the client's address, inverted
        ("::1", None),
        ("::", None),
        ("2606:4700::1111", None),
        ("fd00:ec2::254", None),  # an IPv6 metadata address: checked as itself
    ],
)
def test_ipv6_forms_of_an_ipv4_address_are_checked_as_that_address(address, ipv4):
    assert egress.embedded_ipv4(ip_address(address)) == (ip_address(ipv4) if ipv4 else None)
    if ipv4:
        with pytest.raises(egress.UnsafeURL):
            egress.check_address(address)
