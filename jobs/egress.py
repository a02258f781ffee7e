"""Where Batchsite may send requests (and endpoint keys): the rules for an endpoint's base URL.

Loopback and private networks are allowed: self-hosted servers (Ollama, vLLM) live there. Link-local
addresses and the clouds' metadata services are refused, since they hand out credentials to whoever
asks from the machine, unless BATCHSITE_ALLOW_PRIVATE_ENDPOINTS is set.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import zlib
from urllib.parse import urlsplit, urlunsplit

import httpcore2
import httpx2
from django.conf import settings

METADATA_HOSTS = {
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
}
METADATA_ADDRESSES = {
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16", "192.0.0.192")
}


class UnsafeURL(ValueError):
    """A base URL Batchsite will not send requests to; the message says why."""


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: what a stored key was entered for."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower().rstrip("."), port


def check_address(address: str) -> None:
    """UnsafeURL if `address` (an IP) is link-local or a cloud metadata service."""
    if settings.BATCHSITE_ALLOW_PRIVATE_ENDPOINTS:
        return
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # fe80::1%eth0 carries a zone
    if isinstance(ip, ipaddress.IPv6Address):
        ip = embedded_ipv4(ip) or ip
    if ip.is_link_local or ip in METADATA_ADDRESSES:
        raise UnsafeURL(
            f"{address} is a link-local or cloud metadata address; endpoints may not point there "
            "(BATCHSITE_ALLOW_PRIVATE_ENDPOINTS=1 allows it)."
        )


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known prefix (RFC 6052): a gateway reaches the IPv4 in it


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to, in each form a host or a gateway may route it: mapped
    (::ffff:a.b.c.d), compatible (::a.b.c.d, deprecated but still parsed), NAT64 (64:ff9b::a.b.c.d), 6to4
    (2002:AABB:CCDD::) and Teredo's client. None for a plain IPv6 address."""
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip in NAT64 or (int(ip) >> 32 == 0 and int(ip) > 1):  # ::a.b.c.d, but not :: or ::1
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    return None


def check_base_url(url: str, resolve: bool = True, must_resolve: bool = False) -> None:
    """UnsafeURL unless `url` is a plain http(s) base URL whose host is an allowed address.

    With `resolve`, the host name is looked up and every address it has is checked. A name that does not
    resolve passes unless `must_resolve` (when a person saves it: a typo, or DNS that answers only later):
    the engine's clients check each address again as they connect (CheckedBackend, wire.CheckedResolver),
    and a lookup that fails then is a failed connection, tried again.
    """
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https"):
        raise UnsafeURL("The base URL must start with http:// or https://.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("The base URL may not contain a user name or password; put the key in the API key field.")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise UnsafeURL("The base URL may not contain ? or #: paths such as /models are appended to it.")
    try:
        _ = parts.port  # a bad port raises ValueError here
        httpx2.URL(url.strip())
    except (ValueError, httpx2.InvalidURL) as e:
        raise UnsafeURL(f"This is not a valid URL: {e}.") from None
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise UnsafeURL("The base URL needs a host name.")
    if host in METADATA_HOSTS and not settings.BATCHSITE_ALLOW_PRIVATE_ENDPOINTS:
        raise UnsafeURL(f"{host} is a cloud metadata service; endpoints may not point there.")
    try:
        ipaddress.ip_address(host)
    except ValueError:  # a name, or an address in a form only the resolver reads (2852039166, 0xa9fea9fe)
        if resolve:
            addresses = resolve_host(host)
            if not addresses and must_resolve:
                raise UnsafeURL(f"{host} does not resolve from this server; check the name.")
            for address in addresses:
                check_address(address)
    else:
        check_address(host)


def check_webhook_url(url: str, must_resolve: bool = False) -> None:
    """UnsafeURL unless a webhook's URL is plain http(s) to an allowed address (unlike a base URL, it may have
    a query: some receivers take their token there)."""
    parts = urlsplit(url.strip())
    check_base_url(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), must_resolve=must_resolve)


def resolve_host(host: str) -> list[str]:
    """The addresses `host` resolves to now; none if it does not resolve."""
    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)]
    except (OSError, UnicodeError):
        return []


def check_peer(response: httpx2.Response) -> None:
    """UnsafeURL if the connection `response` came over ended at a refused address (a name that
    resolved elsewhere when it was checked: DNS rebinding)."""
    stream = response.extensions.get("network_stream")
    peer = stream.get_extra_info("server_addr") if stream is not None else None
    if peer:
        check_address(str(peer[0]))


class CheckedBackend(httpcore2.SyncBackend):
    """httpcore's network backend, connecting only to addresses check_address allows: the name is resolved
    here, each address checked, and the connection made to a checked address, so a name cannot resolve to
    one address for the check and another for the connection (DNS rebinding)."""

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        addresses = resolve_host(host) if not _is_address(host) else [host]
        if not addresses:
            raise httpcore2.ConnectError(f"{host} does not resolve")
        try:
            for address in addresses:
                check_address(address)
        except UnsafeURL as e:
            # As a connection error, which the SDK and httpx report as one; refusal() finds the reason in it.
            raise httpcore2.ConnectError(str(e)) from e
        last: Exception | None = None
        for address in dict.fromkeys(addresses):  # in the resolver's order, each once
            try:
                return _DeadlineStream(super().connect_tcp(address, port, timeout, local_address, socket_options))
            except httpcore2.ConnectError as e:
                last = e
        assert last is not None
        raise last


# The deadline of the call this thread is making (BoundedTransport sets it): httpx's timeouts are per read, so
# a server sending a byte every few seconds, headers or body, would hold the call (and the one remote poller
# of the cluster) for as long as it liked.
_call = threading.local()


class _DeadlineStream(httpcore2.NetworkStream):
    """A connection whose every read and write waits no longer than what is left of the current call's deadline."""

    def __init__(self, inner: httpcore2.NetworkStream):
        self.inner = inner

    def _timeout(self, timeout: float | None) -> float | None:
        deadline = getattr(_call, "deadline", None)
        if deadline is None:
            return timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise httpcore2.ReadTimeout("The endpoint took longer than Batchsite waits for one call.")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self._timeout(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self._timeout(timeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return _DeadlineStream(self.inner.start_tls(ssl_context, server_hostname, self._timeout(timeout)))

    def get_extra_info(self, info: str):
        return self.inner.get_extra_info(info)


def checked_transport() -> BoundedTransport:
    """An httpx transport whose connections go only to allowed addresses (CheckedBackend), and that reads no
    answer past a bound (BoundedTransport)."""
    transport = httpx2.HTTPTransport(trust_env=False)
    # httpx builds its pool without a way to pass a network backend; the pool reads this attribute for each
    # new connection (tests/test_hardening_answers.py fails if an upgrade changes that).
    transport._pool._network_backend = CheckedBackend()
    return BoundedTransport(transport)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def refusal(error: BaseException) -> str:
    """Why a failed call's connection was refused here (an UnsafeURL among its causes), or ""."""
    cause: BaseException | None = error
    for _ in range(20):  # a chain of causes is short; a cycle must not hang
        if cause is None:
            break
        if isinstance(cause, UnsafeURL):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    return ""


# What httpx reads from an endpoint: the SDK's Files and Batches calls (remote.client_for), the endpoint Test.
CALL_DEADLINE = 120.0  # seconds for a whole call: connecting, sending, the answer's headers and body
FILE_DEADLINE = 3600.0  # for a result file's content (up to 200 MB at a slow endpoint)
CONTROL_BYTES = 8 * 1024 * 1024  # a batch object, a list of them, an error: a few KB each, honestly
PIECE = 1024 * 1024


class BoundedTransport(httpx2.BaseTransport):
    """Wraps a transport so that no answer is read past a bound: inflated here, a piece at a time (gzip and
    deflate; the encoding header is dropped, so httpx inflates nothing itself), and at most CONTROL_BYTES of
    it, except a file's content (`/files/{id}/content`), which is read line by line with each line bounded
    (engine.wire.bounded_lines). Past the bound the read fails with httpx2.RemoteProtocolError, which the remote engine
    treats as a failed call: tried again later, the reason kept on the chunk."""

    def __init__(self, inner: httpx2.BaseTransport, limit: int = CONTROL_BYTES):
        self.inner, self.limit = inner, limit

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        whole_file = request.url.path.endswith("/content")
        _call.deadline = time.monotonic() + (FILE_DEADLINE if whole_file else CALL_DEADLINE)
        request.headers["accept-encoding"] = "gzip, deflate"  # the encodings inflated here, in bounded pieces
        response = self.inner.handle_request(request)
        # A file's content is read whole (its lines bounded); an error about it is bounded like any answer.
        limit = None if whole_file and 200 <= response.status_code < 300 else self.limit
        declared = response.headers.get("content-length", "")
        encoding = response.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
            response.close()
            raise httpx2.DecodingError(
                f"The endpoint answered in an encoding Batchsite did not ask for: {encoding[:40]}."
            )
        if limit is not None and declared.isdigit() and int(declared) > limit and encoding in ("", "identity"):
            response.close()
            raise httpx2.RemoteProtocolError(_too_large(limit), request=request)
        headers = [
            (k, v) for k, v in response.headers.multi_items() if k.lower() not in ("content-encoding", "content-length")
        ]
        stream = _BoundedStream(response.stream, encoding, limit, request)  # type: ignore[arg-type]
        return httpx2.Response(response.status_code, headers=headers, stream=stream, extensions=response.extensions)

    def close(self) -> None:
        self.inner.close()


def _too_large(limit: int) -> str:
    return f"The endpoint's answer is more than {limit / 2**20:.0f} MB; Batchsite did not read the rest."


class _BoundedStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, encoding: str, limit: int | None, request: httpx2.Request):
        self.inner, self.limit, self.request = inner, limit, request
        self.encoding = encoding

    def __iter__(self):
        inflater = inflater_for(self.encoding)
        size = 0
        for chunk in self.inner:
            for piece in _pieces(inflater, chunk):
                size += len(piece)
                if self.limit is not None and size > self.limit:
                    self.close()
                    raise httpx2.RemoteProtocolError(_too_large(self.limit), request=self.request)
                yield piece

    def close(self) -> None:
        self.inner.close()


def inflater_for(encoding: str):
    """A zlib inflater for a Content-Encoding of gzip or deflate (the two Batchsite asks for); None for none."""
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return None


def _pieces(inflater, chunk: bytes):
    """`chunk` inflated a PIECE at a time (a 64 KB gzip chunk may hold 64 MB), or as it is."""
    if inflater is None:
        yield chunk
        return
    try:
        data = inflater.decompress(chunk, PIECE)
        while True:
            if data:
                yield data
            if not inflater.unconsumed_tail:
                return
            data = inflater.decompress(inflater.unconsumed_tail, PIECE)
    except zlib.error as e:
        raise httpx2.DecodingError(f"The answer's {e}") from None
