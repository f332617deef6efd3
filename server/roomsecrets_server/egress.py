"""The egress policy: every outbound HTTP call the server makes goes through here (today the
OAuth token endpoint: code exchange and refresh; later discovery).

A caller of the server chooses the URL, so the server must not become its way into the network
it runs in. For each connection this module

- resolves the host once and judges every address it resolves to; ALL must pass (a name with one
  internal address among public ones is refused whole: that is how DNS rebinding and split
  answers look). Refused: loopback, private (RFC 1918, fc00::/7), link-local (169.254.0.0/16 with
  the cloud metadata address, fe80::/10), shared CGNAT space, multicast, unspecified, broadcast,
  reserved, documentation and benchmarking ranges, site-local, the deprecated IPv4-compatible
  IPv6 form, and IPv6 forms that embed an IPv4 address (IPv4-mapped, NAT64 64:ff9b::/96, 6to4,
  Teredo) are judged by that address;
- connects to exactly the addresses it judged (no second lookup, so no rebinding window); TLS
  still sends the host name (SNI) and verifies the certificate against it;
- ignores proxy environment variables, follows no redirect (a 3xx is a failure), asks for and
  accepts only an unencoded body (no decompression bomb), stops reading past
  `max_response_bytes`, and bounds each request's total time (resolve, connect, TLS, request and
  response together) by `timeout`.

An operator opens refused destinations with an allow-list (`--egress-allow`): `CIDR` (or a bare
IP address) opens those addresses on any port; `IP:PORT` and `[IPV6]:PORT` one address on one
port; `HOST` a host name, whatever it resolves to, on any port; `HOST:PORT` that name on that
port only. A host entry matches the name in the URL (case-insensitive, exact: no wildcards), not
the addresses it had when the server started: nothing is resolved until a call needs it.

What callers learn: a refused destination is FAILED_PRECONDITION (EGRESS_DENIED) before a single
packet is sent; every failure of the remote side (DNS, refused, reset, timeout, TLS, redirect,
oversized or undecodable answer) is one fixed UNAVAILABLE message, so the server cannot be used
to tell closed ports from open ones or to read what an internal service answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore2
import httpx2

from .errors import DomainError, FailedPrecondition, Unavailable

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses to connect to, in order (the system resolver unless a test says so).
Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_RESPONSE_BYTES = 256 * 1024
DEFAULT_TIMEOUT = 10.0
ALLOW_HINT = "operators may allow it with --egress-allow"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class EgressDenied(FailedPrecondition):
    """The destination is one the egress policy refuses; nothing was sent."""

    reason = "EGRESS_DENIED"


class _RemoteFailed(Exception):
    """The remote answered in a way this module refuses (redirect, encoding, size). Never shown:
    the guard turns it, like every network error, into the one fixed UNAVAILABLE message."""


# -- what an address is ------------------------------------------------------------------------
def _networks(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), what) for net, what in pairs)


# First match names the refusal, so the narrower networks come first.
_REFUSED_V4 = _networks(
    ("255.255.255.255/32", "broadcast"),
    ("0.0.0.0/8", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "shared (carrier-grade NAT)"),
    ("169.254.0.0/16", "link-local"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_REFUSED_V6 = _networks(
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("fc00::/7", "private (unique local)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("2001:2::/48", "benchmarking"),
    ("2001:10::/28", "reserved"),
    ("2001:20::/28", "reserved"),
)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def classify(address: IPAddress) -> str | None:
    """None if the policy lets the server reach `address`; else what the address is."""
    if isinstance(address, ipaddress.IPv4Address):
        return _first(address, _REFUSED_V4)
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        form, inner = embedded
        judged = [w for w in map(classify, inner) if w]
        return f"{form} {judged[0]}" if judged else None
    found = _first(address, _REFUSED_V6)
    if found is None and address not in _GLOBAL_UNICAST_V6:
        return "reserved"  # everything outside 2000::/3 is unallocated or special
    return found


def _first(address: IPAddress, table: tuple[tuple[IPNetwork, str], ...]) -> str | None:
    return next((what for net, what in table if address in net), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, list[ipaddress.IPv4Address]] | None:
    """IPv6 forms that carry IPv4 addresses packets end up at, and those addresses."""
    if address.ipv4_mapped is not None:
        return "IPv4-mapped", [address.ipv4_mapped]
    if address in _NAT64:
        return "NAT64", [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return "6to4", [address.sixtofour]
    if address.teredo is not None:
        return "Teredo", list(address.teredo)  # (server, client)
    return None


def _unmapped(address: IPAddress) -> IPAddress:
    """::ffff:a.b.c.d is a.b.c.d (the same host, on a dual-stack socket)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def ip_literal(host: str) -> IPAddress | None:
    """`host` as an IP address if it is one (URL brackets and an IPv6 zone allowed)."""
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def odd_ipv4_spelling(host: str) -> bool:
    """True for hosts the C resolver reads as IPv4 although they are not dotted-quad decimal:
    2130706433, 0x7f.1, 0177.0.0.1, 127.1 -- an obscured address, never a host name."""
    if ip_literal(host) is not None or not re.fullmatch(r"[0-9A-Fa-fXx.]+", host):
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _refused(host: str, verb: str, what: str) -> str:
    article = "an" if what[:1].lower() in "aeiou" else "a"
    return f"{host} {verb} {article} {what} address, which the server's egress policy refuses ({ALLOW_HINT})"


# -- the operator's allow-list -----------------------------------------------------------------
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}$)({_LABEL}\.)*{_LABEL}")
_ENTRY_FORMS = "HOST, HOST:PORT, IP, IP:PORT, [IPV6]:PORT or a CIDR such as 10.0.0.0/8"


@dataclass(frozen=True, slots=True)
class AllowEntry:
    """One `--egress-allow` entry: a network (a CIDR, or one address) or a host name, with a port
    or None for any."""

    text: str
    network: IPNetwork | None = None
    host: str = ""
    port: int | None = None

    def allows(self, host: str, address: IPAddress, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            return _unmapped(address) in self.network or address in self.network
        return _normal_host(host) == self.host


def _normal_host(host: str) -> str:
    return host.lower().removesuffix(".")


def parse_allow_entry(text: str) -> AllowEntry:
    """An allow-list entry, or ValueError saying what is wrong with it."""
    entry = text.strip()

    def bad(why: str) -> ValueError:
        return ValueError(f"egress_allow entry {text!r}: {why} (expected {_ENTRY_FORMS})")

    if not entry:
        raise bad("empty")
    if "/" in entry:
        try:
            return AllowEntry(entry, network=ipaddress.ip_network(entry, strict=True))
        except ValueError as error:
            raise bad(f"not a CIDR ({error})") from None
    ipv6 = entry.startswith("[") or entry.count(":") > 1
    host, port = entry, None
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise bad("an IPv6 address in brackets is written [ADDRESS] or [ADDRESS]:PORT")
        host, port = inside, _port(rest[1:], bad) if rest else None
    elif not ipv6 and ":" in entry:
        host, _, port_text = entry.partition(":")
        port = _port(port_text, bad)
    address = ip_literal(host)
    if ipv6:
        if not isinstance(address, ipaddress.IPv6Address):
            raise bad("not an IPv6 address (with a port, write [ADDRESS]:PORT)")
        return AllowEntry(entry, network=ipaddress.ip_network(address), port=port)
    if address is not None:
        return AllowEntry(entry, network=ipaddress.ip_network(address), port=port)
    if "*" in host:
        raise bad("wildcards are not supported: list each host name, or give a CIDR")
    if odd_ipv4_spelling(host):
        raise bad("write IPv4 addresses in dotted-decimal form")
    if not _HOST_NAME.fullmatch(host.removesuffix(".")):
        raise bad("not a host name (letters, digits, hyphens and dots; IDNs in their xn-- form)")
    return AllowEntry(entry, host=_normal_host(host), port=port)


def _port(text: str, bad: Callable[[str], ValueError]) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise bad(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def parse_allow_list(entries: Iterable[str]) -> tuple[AllowEntry, ...]:
    return tuple(parse_allow_entry(e) for e in entries)


# -- the policy ----------------------------------------------------------------------------------
async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class EgressPolicy:
    """Judges destinations and makes the HTTP clients that honour the judgement."""

    def __init__(
        self,
        allow: Iterable[str] = (),
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        ssl_context: ssl.SSLContext | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.allow = parse_allow_list(allow)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        # Certificate locations from SSL_CERT_FILE/SSL_CERT_DIR are honoured (an operator's
        # private CA); proxies from the environment never are (trust_env=False below).
        self.ssl_context = ssl_context or httpcore2.default_ssl_context()
        self._resolver = resolver

    # -- judging ----------------------------------------------------------------------------
    def refusal(self, host: str, address: IPAddress, port: int) -> str | None:
        """What `address` is, if the policy refuses it for (host, port); None if allowed."""
        what = classify(address)
        if what is None or any(e.allows(host, address, port) for e in self.allow):
            return None
        return what

    def literal_refusal(self, url: str) -> str | None:
        """For a URL whose host is an IP literal the policy refuses: why, as a sentence to put
        after the field name. None for host names (judged when connecting) and allowed IPs."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
        except ValueError:
            return None  # not a URL at all: the URL check names that
        address = ip_literal(host)
        if address is None:
            return None
        what = self.refusal(host, address, port)
        if what is None:
            return None
        return _refused(host, "is", what)

    async def addresses(self, field: str, host: str, port: int) -> list[str]:
        """The addresses to connect to for (host, port): resolved once, every one judged."""
        literal = ip_literal(host)
        found = [str(literal)] if literal is not None else await self._resolver(host, port)
        if not found:
            raise OSError(f"{host} resolved to no address")
        for text in found:
            what = self.refusal(host, ipaddress.ip_address(text.partition("%")[0]), port)
            if what is not None:
                raise EgressDenied(
                    f"{field}: {_refused(host, 'is' if literal is not None else 'resolves to', what)}"
                )
        return found

    # -- calling ----------------------------------------------------------------------------
    def client_options(self, field: str) -> dict[str, Any]:
        """Keyword arguments for an httpx2.AsyncClient (or authlib's AsyncOAuth2Client, one) whose
        requests go through this policy; `field` names the destination in refusals."""
        return {
            "transport": _EgressTransport(self, field),
            "trust_env": False,  # no HTTP(S)_PROXY / ALL_PROXY / NO_PROXY, no .netrc
            "follow_redirects": False,
            "timeout": self.timeout,
        }

    @asynccontextmanager
    async def guard(self, field: str, *, unavailable_reason: str) -> AsyncIterator[None]:
        """Around one outbound exchange: domain errors (a refusal, the caller's own judgement of
        the answer) pass; any other failure becomes one fixed UNAVAILABLE message that does not
        say what failed, so a caller cannot tell a closed port from a silent or TLS-less one."""
        try:
            yield
        except DomainError:
            raise
        except Exception as error:  # DNS, connect, TLS, timeouts, resets, redirects, size, bad JSON
            # The operator may know why (the caller may not): the kind of failure, never a body.
            log.info("outbound call for %s failed: %s", field, type(error).__name__)
            raise Unavailable(
                f"{field}: the endpoint could not be reached or gave no usable answer",
                reason=unavailable_reason,
            ) from None


class _PinnedBackend(httpcore2.AsyncNetworkBackend):
    """Connects only to addresses the policy judged, for the host the URL names."""

    def __init__(self, policy: EgressPolicy, field: str) -> None:
        self._policy = policy
        self._field = field
        self._network = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        failure: Exception = OSError(f"cannot connect to {host}")
        for address in await self._policy.addresses(self._field, host, port):
            try:
                return await self._network.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as error:
                failure = error
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
        raise EgressDenied(f"{self._field}: Unix sockets are not an egress destination")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _EgressTransport(httpx2.AsyncBaseTransport):
    """httpx's transport over a connection pool on the pinned backend, with the policy's bounds
    on what comes back."""

    def __init__(self, policy: EgressPolicy, field: str) -> None:
        self._policy = policy
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=policy.ssl_context,
            max_connections=1,
            http1=True,
            http2=False,
            retries=0,
            network_backend=_PinnedBackend(policy, field),
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        assert isinstance(request.stream, httpx2.AsyncByteStream)
        deadline = asyncio.get_running_loop().time() + self._policy.timeout
        request.headers["Accept-Encoding"] = "identity"  # bytes counted are the bytes parsed
        core = httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        async with asyncio.timeout_at(deadline):
            response = await self._pool.handle_async_request(core)
        try:
            _check_head(response, self._policy.max_response_bytes)
        except BaseException:
            await response.aclose()
            raise
        assert isinstance(response.stream, AsyncIterable)
        return httpx2.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_BoundedStream(response, response.stream, self._policy.max_response_bytes, deadline),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


def _check_head(response: httpcore2.Response, limit: int) -> None:
    if 300 <= response.status < 400:
        raise _RemoteFailed("redirect")  # not followed: it could point anywhere, loopback too
    headers = {k.lower(): v for k, v in response.headers}
    if headers.get(b"content-encoding", b"identity").strip().lower() != b"identity":
        raise _RemoteFailed("encoded body")
    length = headers.get(b"content-length", b"")
    if length.strip().isdigit() and int(length) > limit:
        raise _RemoteFailed("too large")


class _BoundedStream(httpx2.AsyncByteStream):
    """The response body, cut off past `limit` bytes or the request's deadline."""

    def __init__(
        self, response: httpcore2.Response, body: AsyncIterable[bytes], limit: int, deadline: float
    ) -> None:
        self._response = response
        self._body = body
        self._limit = limit
        self._deadline = deadline

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = aiter(self._body)
        received = 0
        while True:
            async with asyncio.timeout_at(self._deadline):  # not across the yield below
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
            received += len(chunk)
            if received > self._limit:
                raise _RemoteFailed("too large")
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()
