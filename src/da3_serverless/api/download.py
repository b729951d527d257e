"""Downloading an `image_url` as an attacker would serve it (docs/ARCHITECTURE.md §5), and
posting a job's webhook through the same address checks (`post_json`).

- One deadline (`settings.download_timeout_s`) covers the whole download: DNS runs in a worker
  thread waited on for at most the time left, and every connect, TLS handshake, write and read
  gets at most the time left (a network backend that wraps httpcore's own), so a slow drip
  cannot outlast it.
- Addresses: every address a host resolves to, on every redirect, is checked against an explicit
  list of denied networks (`DENIED_NETWORKS`), and the connection goes to the checked address
  (no DNS rebinding). IPv6 must be global unicast (2000::/3); 6to4 is judged by the IPv4 address
  it embeds. The list is ours, not Python's `is_global`, whose tables change between releases.
- Bytes: raw, as sent (httpcore never decodes), asking for `Accept-Encoding: identity`; at most
  one gzip or deflate layer is decoded here with a bounded `decompress(..., max_length)`, other
  or stacked encodings are refused; both the raw and the decoded size are capped by
  `settings.max_download_bytes`.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from functools import cache
from typing import Any

import httpcore
import httpx

from da3_serverless.api.errors import ServiceError
from da3_serverless.config import Settings

MAX_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "da3-serverless (image fetcher)"
MAX_ADDRESSES_TRIED = 4
# Decoded bytes per decompress call: zlib builds each call's output twice (blocks, then one
# bytes object), so small steps keep the peak near the cap instead of twice it.
DECODE_STEP = 1 << 20
# Cloud metadata endpoints: denied networks anyway; named so the message says what they are.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
# (network, what an address in it is). Anything not listed is public IPv4, or IPv6 inside
# 2000::/3 (checked separately); 6to4 (2002::/16) is judged by the IPv4 address it carries.
DENIED_NETWORKS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a private (shared, carrier-grade NAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "a reserved (IETF protocol) address"),
    ("192.0.2.0/24", "a reserved (documentation) address"),
    ("192.88.99.0/24", "a reserved (6to4 relay) address"),
    ("192.168.0.0/16", "a private address"),
    ("198.18.0.0/15", "a reserved (benchmarking) address"),
    ("198.51.100.0/24", "a reserved (documentation) address"),
    ("203.0.113.0/24", "a reserved (documentation) address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),  # includes 255.255.255.255
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("::/96", "an IPv4-compatible address"),
    ("::ffff:0:0/96", "an IPv4-mapped address"),
    ("::ffff:0:0:0/96", "an IPv4-translated address"),
    ("64:ff9b::/96", "a NAT64 address"),
    ("64:ff9b:1::/48", "a NAT64 (local-use) address"),
    ("100::/64", "a reserved (discard-only) address"),
    ("2001::/23", "a reserved (IETF protocol, Teredo) address"),
    ("2001:db8::/32", "a reserved (documentation) address"),
    ("3fff::/20", "a reserved (documentation) address"),
    ("5f00::/16", "a reserved (SRv6) address"),
    ("fc00::/7", "a private (unique local) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
)
_DENIED = tuple((ipaddress.ip_network(net), what) for net, what in DENIED_NETWORKS)
GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
# DNS lookups cannot be interrupted: they run here and are waited on for the time left only.
_DNS_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="da3-dns")
_TIMEOUTS = (httpcore.TimeoutException, FutureTimeout, TimeoutError)
_NETWORK_ERRORS = (
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
    ssl.SSLError,
    OSError,
)


# ---- addresses --------------------------------------------------------------------------------


def refusal_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a download may not connect to `ip` (None if it may), from `DENIED_NETWORKS`."""
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for network, what in _DENIED:
        if network.version == ip.version and ip in network:
            return what
    if isinstance(ip, ipaddress.IPv6Address):
        if ip not in GLOBAL_UNICAST_V6:
            return "a reserved address (IPv6 outside the global unicast range 2000::/3)"
        if ip in SIX_TO_FOUR:
            embedded = refusal_reason(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
            return f"{embedded} inside a 6to4 address" if embedded else None
    return None


def resolve(host: str, port: int) -> list[str]:
    """All addresses `host` resolves to (TCP). Tests replace this to simulate DNS."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Clock:
    """The download's one deadline."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self, error: type[Exception] = httpcore.ReadTimeout) -> float:
        """Seconds left; raises `error` once there are none."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise error("the download's deadline passed")
        return remaining


def _addresses(url: httpx.URL, settings: Settings, clock: _Clock) -> list[str]:
    """The addresses to connect to for `url`, each checked (unless private URLs are allowed):
    a host with one denied address among public ones is refused. A literal IP is not looked up."""
    host = url.raw_host.decode("ascii")
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        future = _DNS_POOL.submit(resolve, host, url.port or (443 if url.scheme == "https" else 80))
        try:
            addresses = future.result(timeout=clock.left(TimeoutError))
        except TimeoutError:  # an OSError too: the deadline, not a failed lookup
            raise
        except (OSError, UnicodeError):
            raise ServiceError(
                "fetch_failed", f"could not resolve the image URL's host {host!r}: check the URL"
            ) from None
        finally:
            future.cancel()
    if not addresses:
        raise ServiceError("fetch_failed", f"the image URL's host {host!r} has no address")
    if settings.allow_private_urls:
        return addresses
    for address in addresses:
        reason = refusal_reason(ipaddress.ip_address(address.split("%")[0]))
        if reason:
            raise ServiceError(
                "invalid_input",
                f"the image URL's host {host!r} resolves to {reason}; downloads may only reach "
                "public internet addresses (private, loopback, link-local and metadata addresses "
                "are refused): use a publicly reachable URL or send the image as image_base64",
            )
    return addresses


# ---- a network backend that keeps the deadline ------------------------------------------------


class _DeadlineStream(httpcore.NetworkStream):
    """httpcore's stream, every operation's timeout cut to the time left."""

    def __init__(self, inner: httpcore.NetworkStream, clock: _Clock):
        self._inner, self._clock = inner, clock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._clock.left(httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._clock.left(httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        left = self._clock.left(httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, left), self._clock
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """TCP connections whose streams keep the download's deadline (no Unix sockets)."""

    def __init__(self, clock: _Clock):
        self._inner, self._clock = httpcore.SyncBackend(), clock

    def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:  # fmt: skip
        left = self._clock.left(httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, left, local_address, socket_options)
        return _DeadlineStream(stream, self._clock)


@cache
def ssl_context() -> ssl.SSLContext:
    """The TLS settings of downloads: httpx's defaults (certificates verified). Tests replace
    this to trust their own certificate."""
    return httpx.create_ssl_context(trust_env=False)


# ---- downloading ------------------------------------------------------------------------------


def fetch_url(url: str, settings: Settings) -> bytes:
    """Download an image over http(s) within `settings.download_timeout_s` (everything: DNS,
    redirects, connects, reads) and `settings.max_download_bytes` (raw and decoded).

    Redirects are followed here (at most 5), each hop resolved and checked; the request goes
    to the checked address with the original Host header and TLS server name. Errors:
    invalid_input (bad scheme, refused address), fetch_failed (DNS, network, HTTP status,
    timeout, malformed redirect, unsupported Content-Encoding), image_too_large (size cap).
    Messages name the host only, never the full URL (it may carry tokens).
    """
    current = _parse_url(url)
    clock = _Clock(settings.download_timeout_s)
    host = current.host
    try:
        with httpcore.ConnectionPool(
            ssl_context=ssl_context(), network_backend=_DeadlineBackend(clock), retries=0
        ) as pool:
            for _ in range(MAX_REDIRECTS + 1):
                host = current.host
                addresses = _addresses(current, settings, clock)
                with ExitStack() as stack:
                    response = _get(stack, pool, current, addresses)
                    if response.status in REDIRECT_CODES:
                        current = _redirect_target(current, response)
                        continue
                    if response.status != 200:
                        reason = httpx.codes.get_reason_phrase(response.status)
                        raise ServiceError(
                            "fetch_failed",
                            f"the image URL's server ({host}) answered HTTP {response.status} "
                            f"{reason}: check that the URL is public and points to an image",
                        )
                    return read_body(response, settings, host)
    except _TIMEOUTS:
        raise _timed_out(host, settings) from None
    except zlib.error:
        raise ServiceError(
            "fetch_failed",
            f"the compressed image from {host} could not be decoded: serve the file as it is",
        ) from None
    except _NETWORK_ERRORS as exc:
        raise ServiceError(
            "fetch_failed",
            f"could not download the image from {host} ({type(exc).__name__}): check that the "
            "URL is reachable from the internet",
        ) from None
    raise ServiceError(
        "fetch_failed",
        f"the image URL redirected more than {MAX_REDIRECTS} times: give the final URL",
    )


def _parse_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise ServiceError(
            "invalid_input",
            "the image URL must be an absolute http:// or https:// URL "
            "(other schemes such as file:// or ftp:// are refused)",
        )
    return parsed


def _get(
    stack: ExitStack, pool: httpcore.ConnectionPool, url: httpx.URL, addresses: list[str]
) -> httpcore.Response:
    """GET `url` from the first of its checked `addresses` that accepts a connection; the
    response is open until `stack` closes."""
    headers = [
        (b"Host", url.netloc),
        (b"User-Agent", USER_AGENT.encode()),
        (b"Accept", b"image/*, */*;q=0.5"),
        (b"Accept-Encoding", b"identity"),
    ]
    extensions = {"sni_hostname": url.raw_host.decode("ascii")}
    for attempt, address in enumerate(addresses[:MAX_ADDRESSES_TRIED]):
        target = httpcore.URL(
            scheme=url.raw_scheme, host=address.encode(), port=url.port, target=url.raw_path
        )
        try:
            return stack.enter_context(
                pool.stream("GET", target, headers=headers, extensions=extensions)
            )
        except httpcore.ConnectError:
            if attempt + 1 >= min(len(addresses), MAX_ADDRESSES_TRIED):
                raise
    raise AssertionError("unreachable: addresses is never empty")


def _redirect_target(current: httpx.URL, response: httpcore.Response) -> httpx.URL:
    """The URL a redirect points to; a missing or malformed Location is `fetch_failed`."""
    host = current.host
    location = _header(response, b"location")
    if location is None or not location.strip():
        raise ServiceError(
            "fetch_failed",
            f"the image URL's server ({host}) answered HTTP {response.status} (a redirect) "
            "without a Location: give the final URL of the image",
        )
    try:
        target = current.join(location.strip())
    except (httpx.InvalidURL, TypeError, ValueError, UnicodeError):
        target = None
    if target is not None and target.scheme not in ("http", "https"):
        return _parse_url(str(target))  # refused: invalid_input, as for the first URL
    if target is None or not target.raw_host:
        raise ServiceError(
            "fetch_failed",
            f"the image URL's server ({host}) redirected to a malformed Location: give the "
            "final URL of the image",
        )
    return target


def _header(response: httpcore.Response, name: bytes) -> str | None:
    """The response's header `name` (lower case), all its values joined by ', '; or None."""
    values = [v.decode("latin-1") for k, v in response.headers if k.lower() == name]
    return ", ".join(values) if values else None


# ---- the body ---------------------------------------------------------------------------------


def read_body(response: httpcore.Response, settings: Settings, host: str) -> bytes:
    """The response body: raw bytes, or one gzip/deflate layer decoded, never more than
    `settings.max_download_bytes` either way (checked as the bytes arrive)."""
    limit = settings.max_download_bytes
    too_large = ServiceError(
        "image_too_large",
        f"the image at {host} is larger than this server's download limit of {limit} bytes: "
        "send a smaller (e.g. resized or JPEG-compressed) image",
    )
    declared = _header(response, b"content-length") or ""
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    decoder = _decoder(_header(response, b"content-encoding"), host)
    chunks: list[bytes] = []
    raw = decoded = 0
    for chunk in response.iter_stream():
        raw += len(chunk)
        if raw > limit:
            raise too_large
        while chunk:
            if decoder is None:
                out, chunk = chunk, b""
            else:
                out = decoder.decompress(chunk, min(limit - decoded + 1, DECODE_STEP))
                chunk = decoder.unconsumed_tail if not decoder.eof else b""
            decoded += len(out)
            if decoded > limit:
                raise too_large
            chunks.append(out)
    if decoder is not None and not decoder.eof:
        raise ServiceError(
            "fetch_failed",
            f"the compressed image from {host} ended early: check that the URL serves the "
            "complete file",
        )
    return b"".join(chunks)


def _decoder(encoding: str | None, host: str) -> Any:
    """A zlib decompressor for one gzip or deflate layer; None for none (or identity)."""
    layers = [e.strip().lower() for e in (encoding or "").split(",")]
    layers = [e for e in layers if e and e != "identity"]
    if not layers:
        return None
    if len(layers) == 1 and layers[0] in ("gzip", "x-gzip", "deflate"):
        # gzip, or deflate in its zlib wrapper (HTTP's "deflate"); 32 + 15 reads either header.
        return zlib.decompressobj(16 + 15 if layers[0] != "deflate" else 32 + 15)
    raise ServiceError(
        "fetch_failed",
        f"the image from {host} is sent with Content-Encoding {encoding[:60]!r}; this server "
        "decodes at most one gzip or deflate layer: serve the image file as it is",
    )


def _timed_out(host: str, settings: Settings) -> ServiceError:
    return ServiceError(
        "fetch_failed",
        f"downloading the image from {host} took longer than {settings.download_timeout_s:g} s: "
        "use a faster host or send the image as image_base64",
    )


# ---- webhooks ---------------------------------------------------------------------------------


def post_json(url: str, body: bytes, settings: Settings, timeout_s: float) -> int:
    """POST `body` (JSON) to `url` within `timeout_s` (DNS, connect, send and the answer's
    status line) through the same address checks as downloads; no redirect is followed.
    Returns the HTTP status; raises `ServiceError` (refused address, network error, timeout)."""
    target = _parse_url(url)
    clock = _Clock(timeout_s)
    headers = [
        (b"Host", target.netloc),
        (b"User-Agent", USER_AGENT.replace("image fetcher", "webhook").encode()),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", str(len(body)).encode()),
    ]
    extensions = {"sni_hostname": target.raw_host.decode("ascii")}
    try:
        address = _addresses(target, settings, clock)[0]
        with httpcore.ConnectionPool(
            ssl_context=ssl_context(), network_backend=_DeadlineBackend(clock), retries=0
        ) as pool:
            endpoint = httpcore.URL(
                scheme=target.raw_scheme, host=address.encode(), port=target.port,
                target=target.raw_path,
            )  # fmt: skip
            with pool.stream(
                "POST", endpoint, headers=headers, content=body, extensions=extensions
            ) as response:  # its body is never read
                return response.status
    except _TIMEOUTS:
        raise ServiceError(
            "fetch_failed", f"{target.host} did not answer in {timeout_s:g} s"
        ) from None
    except _NETWORK_ERRORS as exc:
        raise ServiceError(
            "fetch_failed", f"could not reach {target.host} ({type(exc).__name__})"
        ) from None
