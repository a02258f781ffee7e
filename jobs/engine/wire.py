"""The live engine's HTTP client: aiohttp used directly, bounded, and careful about where it connects.

The openai SDK cost ~1.2 ms of CPU a request on these machines (FACTS.md) and reads whole bodies, error
bodies included. This client:
- reads an answer up to BATCHSITE_MAX_ANSWER_MB (decompressed) and an error body up to ERROR_BYTES, and
  then stops reading: a 200 MB answer costs a few MB of memory, not 200 (AnswerTooLarge);
- follows no redirect (a 3xx is an answer: upstream.classify refuses it);
- connects only to addresses egress allows, checked on each new connection against the addresses it
  connects to (CheckedResolver): a name that resolved to an allowed address when its endpoint was saved
  and to a metadata service now (DNS rebinding) never gets a byte.
The Files/Batches conversation of remote mode keeps the SDK (remote.client_for), where its cost does not
matter.
"""

from __future__ import annotations

import functools
import json
import re
import socket
import ssl
import zlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import aiohttp
import httpx2
from aiohttp.abc import ResolveResult
from django.conf import settings
from multidict import CIMultiDictProxy

from jobs import egress

ERROR_BYTES = 64 * 1024  # of an error's body: its code and message are in the first few hundred bytes
USER_AGENT = "Batchsite"


class AnswerTooLarge(Exception):
    def __init__(self, limit: int, declared: int | None = None):
        self.limit = limit
        size = f"{declared / 2**20:.1f} MB" if declared else f"more than {limit / 2**20:.0f} MB"
        super().__init__(
            f"The endpoint's answer is {size}; Batchsite reads answers up to {limit / 2**20:.0f} MB "
            "(BATCHSITE_MAX_ANSWER_MB) and did not read the rest."
        )


class Answer(NamedTuple):
    status: int
    headers: CIMultiDictProxy[str]
    text: str


class CheckedResolver(aiohttp.ThreadedResolver):
    """Resolves as aiohttp does, then refuses (egress.UnsafeURL, which aiohttp lets through) when any address
    is one endpoints may not reach. aiohttp connects only to the addresses returned here, so the check
    holds for the connection actually made. Host names given as IP addresses never come here: the runner
    checks those before each slice (egress.check_base_url), and they cannot change."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        hosts = await super().resolve(host, port, family)
        for entry in hosts:
            egress.check_address(entry["host"])
        return hosts


def max_answer_bytes() -> int:
    return settings.BATCHSITE_MAX_ANSWER_MB * 1024 * 1024


class Client:
    """One per slice: a connection pool to one endpoint."""

    def __init__(self, base_url: str, api_key: str, timeout: float, connect_timeout: float = 15.0):
        self.base_url = base_url.rstrip("/")
        self.limit = max_answer_bytes()
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            # Only encodings whose expansion is bounded here (_Inflate); a server that sends another gets it read
            # as it is, within the limit, and fails as not JSON.
            "Accept-Encoding": "gzip, deflate",
            "User-Agent": USER_AGENT,
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=tls_context(), resolver=CheckedResolver()),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
            auto_decompress=False,  # decompressed here, bounded: a 1 MB gzip bomb is 1 GB once inflated
            trust_env=False,  # no proxy from the environment: the connect-time address check is ours
        )

    async def post(self, path: str, body: bytes) -> Answer:
        """The answer to POST base_url + path; AnswerTooLarge past the limit, egress.UnsafeURL when the name
        leads to a refused address, aiohttp's and asyncio's errors when the network fails."""
        async with self.session.post(self.base_url + path, data=body, allow_redirects=False) as response:
            limit = self.limit if response.status < 300 else ERROR_BYTES
            declared = response.content_length
            if response.status < 300 and declared is not None and declared > limit:
                response.close()  # the rest is never read: the connection is dropped, not drained
                raise AnswerTooLarge(limit, declared)
            data = await _read(response, limit)
            return Answer(response.status, response.headers, data.decode("utf-8", "replace"))

    async def close(self) -> None:
        await self.session.close()


async def _read(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body (inflated) up to `limit` bytes. Past it, an answer fails (AnswerTooLarge) and an error body
    is cut: its first bytes say what it is."""
    inflate = _Inflate(response.headers.get("Content-Encoding", ""))
    parts: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        data = inflate(chunk, limit - size + 1)
        size += len(data)
        if size > limit:
            response.close()
            if response.status < 300:
                raise AnswerTooLarge(limit)
            parts.append(data[: len(data) - (size - limit)])
            break
        parts.append(data)
    return b"".join(parts)


class _Inflate:
    """gzip and deflate, inflated at most `room` bytes per chunk (the rest is over the limit anyway)."""

    def __init__(self, encoding: str):
        self.inflater = egress.inflater_for(encoding)

    def __call__(self, chunk: bytes, room: int) -> bytes:
        if self.inflater is None:
            return chunk
        try:
            inflated: bytes = self.inflater.decompress(chunk, max(room, 1))
            return inflated
        except zlib.error as e:
            raise aiohttp.ClientPayloadError(f"The answer's {e}") from None


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context per process: loading the CA bundle takes 50-150 ms, which every slice's new client
    would otherwise spend before its first request."""
    return httpx2.create_ssl_context()


def network_error(error: BaseException) -> tuple[str, str]:
    """(code, message) for a request the network failed: a timeout, a refused or dropped connection."""
    if isinstance(error, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
        return "timeout", "The request timed out."
    if isinstance(error, aiohttp.ClientConnectorError):
        return "connection_error", f"Could not connect: {error}"
    return "connection_error", f"The connection failed: {error or type(error).__name__}"


class LongLine(NamedTuple):
    """A line over the limit: its first bytes (where a result line names its custom_id), the rest skipped."""

    head: bytes

    def custom_id(self) -> str | None:
        match = _CUSTOM_ID.search(self.head)
        if match is None:
            return None
        try:
            found: str = json.loads(match[1])  # a JSON string, by the pattern
            return found
        except ValueError:
            return None


_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*("(?:[^"\\]|\\.){0,512}")')
HEAD_BYTES = 4096


def bounded_lines(chunks: Iterable[bytes], limit: int) -> Iterator[bytes | LongLine]:
    """The lines of a stream of bytes, each up to `limit` bytes; a longer one comes as a LongLine, and its
    bytes past the head are dropped as they arrive (memory stays at about `limit`, whatever the file holds).
    Linear in the bytes whatever the chunking: only new bytes are searched (a server can send one byte a
    chunk)."""
    buffer = bytearray()
    skipping: LongLine | None = None
    for chunk in chunks:
        searched = len(buffer)  # the buffer holds no newline: only what arrives now is searched
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", max(start, searched))) >= 0:
            if skipping is not None:
                yield skipping
                skipping = None
            elif end - start > limit:
                yield LongLine(bytes(buffer[start : min(end, start + HEAD_BYTES)]))
            else:
                yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
        if skipping is None and len(buffer) > limit:
            skipping = LongLine(bytes(buffer[:HEAD_BYTES]))
            buffer.clear()
        elif skipping is not None:
            buffer.clear()
    if skipping is not None:
        yield skipping
    elif buffer:
        yield bytes(buffer) if len(buffer) <= limit else LongLine(bytes(buffer[:HEAD_BYTES]))
