"""Plain helpers that make test data: request lines, endpoints, jobs, API tokens. Fixtures live in conftest.py."""

import importlib
import json

import httpx2
import openai
from django.apps import apps

from jobs import export, ingest
from jobs.models import ApiToken, Endpoint


def chat_line(custom_id: str, text: str = "Hello", model: str = "gpt-4o-mini", **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(lines) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def make_endpoint(base_url: str, **fields) -> Endpoint:
    endpoint = Endpoint(name=f"sim {base_url}", base_url=base_url, is_default=True, **fields)
    endpoint.set_api_key("sk-test-simulator-key")
    endpoint.save()
    return endpoint


def make_job(write, owner, endpoint, n: int, text=lambda i: f"Question {i}", start=True, **body):
    """A job of `n` chat requests made the way an upload makes it; `write` is the fixture of that name."""
    lines = [chat_line(f"req-{i}", text(i), **body) for i in range(n)]
    plan = ingest.validate(write(f"job-{n}.jsonl", lines))
    assert plan.ok, plan.errors
    job = ingest.create_job(plan, owner=owner, endpoint=endpoint)
    if start:
        job.start()
    return job


def answers(job) -> dict[str, str]:
    """custom_id -> the answer's text, from the job's exported results; a custom_id twice fails the test."""
    out = {}
    for line in "".join(export.results_jsonl(job)).splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in out, "a custom_id appears twice in the output"
        out[record["custom_id"]] = record["response"]["body"]["choices"][0]["message"]["content"]
    return out


def seed_prices() -> None:
    """Transactional tests flush the price rows a data migration made; put them back."""
    importlib.import_module("jobs.migrations.0003_default_prices").add_prices(apps, None)


def api_headers(user) -> dict:
    """Headers with a new personal API token of `user`, for Django's test client."""
    _, plaintext = ApiToken.create_for(user, "test")
    return {"Authorization": f"Bearer {plaintext}"}


def connection_error(url: str = "http://127.0.0.1/v1/batches") -> openai.APIConnectionError:
    """The error the SDK raises when a connection drops, built as the SDK builds it: with the request it
    was sending (3.63 reads the request's headers to redact secrets; `request=None` no longer works)."""
    return openai.APIConnectionError(request=httpx2.Request("GET", url))
