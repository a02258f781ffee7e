"""An endpoint's "Test connection": one look at its server, through the same egress checks as every call to it.

The verdict is a status and model names, never a body: the URL could be any server's."""

import json
import time

import httpx2

from jobs import egress
from jobs.models import Endpoint


def check(endpoint: Endpoint) -> tuple[bool, str]:
    """Ask the server for its model list, which proves the URL, the key and the network in one request, then
    whether it has the Batch API that remote and hybrid jobs need (llama.cpp, vLLM and Ollama have none).
    (ok, what to tell the user)."""
    started = time.perf_counter()
    try:
        egress.check_base_url(endpoint.base_url)  # again now: the name may resolve elsewhere than when saved
        headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key_encrypted else {}
        base = endpoint.base_url.rstrip("/")
        transport = egress.checked_transport()  # connects only to allowed addresses, checked as it connects
        with httpx2.Client(timeout=10, follow_redirects=False, headers=headers, transport=transport) as client:
            status, body = _get(client, base + "/models")
            ms = int((time.perf_counter() - started) * 1000)
            batches: int | str | None = None
            if status == 200:
                try:
                    batches = _get(client, base + "/batches?limit=1")[0]
                except httpx2.HTTPError as e:  # the server is there: say what its Batch API did
                    batches = type(e).__name__
    except egress.UnsafeURL as e:
        return False, str(e)
    except ValueError as e:  # the stored key cannot be decrypted
        return False, str(e)
    except (httpx2.HTTPError, httpx2.InvalidURL) as e:
        return False, egress.refusal(e) or f"Could not reach {endpoint.base_url}: {type(e).__name__}."
    if status == 200:
        try:
            models = [str(m.get("id"))[:80] for m in json.loads(body).get("data", [])][:8]
        except (ValueError, AttributeError, TypeError):
            models = []
        text = f"Connected in {ms} ms." + (f" Models include: {', '.join(models)}." if models else "")
        return True, text + " " + _batch_api_says(batches)
    if status in (401, 403):
        return False, f"The server refused the API key (HTTP {status})."
    return False, f"The server answered HTTP {status}."


def _get(client: httpx2.Client, url: str) -> tuple[int, bytes]:
    """GET url: its status, and up to 1 MB of a 200's body, read only once the peer's address is checked."""
    with client.stream("GET", url) as response:
        egress.check_peer(response)  # where the connection really went (DNS rebinding)
        body = bytearray()
        if response.status_code == 200:
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > 1_000_000:
                    break
    return response.status_code, bytes(body)


def _batch_api_says(status: int | str | None) -> str:
    if isinstance(status, str):
        return f"Its Batch API did not answer ({status}): remote and hybrid jobs may not run here."
    if status == 200:
        return "Its Batch API answers: remote and hybrid jobs can run here."
    if status in (404, 405, 501):
        return f"It has no Batch API (HTTP {status}): run jobs live here; remote and hybrid jobs need one."
    if status in (401, 403):
        return f"Its Batch API refused the key (HTTP {status}): remote and hybrid jobs would pause."
    return f"Its Batch API answered HTTP {status}."
