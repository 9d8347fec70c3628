"""Fetching a URL that a client named (``lora_weights``; ``image`` and ``mask`` at the entry point).

Any HTTP client of the service sets these inputs, so a fetch must not let it reach the server's
private network or fill its disk. ``fetch``:

* takes ``http://`` and ``https://`` URLs only;
* looks the host up once and connects to the address it checked, never to a second lookup (a name
  that answers a public address to the check and 127.0.0.1 to the connection gets nowhere); for
  https, SNI and the certificate still go by the name;
* refuses, before any connection, an address that is not public: loopback, private, link-local,
  shared (100.64/10), multicast, reserved or unspecified, IPv4 or IPv6, also IPv4-mapped and 6to4
  forms. Numeric spellings (``0x7f000001``, ``2130706433``, ``127.1``) are turned into the address
  by the same lookup, so they are checked as the address they are;
* lets through what the operator lists in ``FASTER_DIFFUSION_ALLOW_HOSTS`` (comma-separated: a host
  name, matched as the URL writes it; an IP or a CIDR, matched against the address looked up), for an
  internal mirror;
* follows at most ``MAX_REDIRECTS`` redirects, each hop checked as the first, and reads no
  redirect's body;
* stops past ``Limits.max_bytes`` (refused up front when Content-Length says so) and past
  ``Limits.seconds`` in all, lookup to last byte, however slowly the server sends: a watchdog
  shuts the socket at the deadline.

Proxy variables (``HTTP_PROXY``...) are not used: a proxy would look the name up itself.
``requests-hardened`` does the lookup-once and pinning the same way, but allows no hosts or CIDRs
(only all of loopback) and lets reserved IPv6 such as ``::7f00:1`` through, so this module does it
on urllib3 and ``ipaddress`` (docs/operations.md). Every failure is a ``FetchError`` (a
ValueError) saying why, without the response's body.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import HTTPError

SCHEMES = {"http": HTTPConnection, "https": HTTPSConnection}
ALLOW_HOSTS = "FASTER_DIFFUSION_ALLOW_HOSTS"
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
CONNECT_TIMEOUT, READ_TIMEOUT = 10.0, 30.0  # seconds for a connection and for one read, within the total
CHUNK = 1 << 16
SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # carries any IPv4 address; global in Python < 3.12.4


class FetchError(ValueError):
    """Why a URL was not fetched."""


@dataclass(frozen=True)
class Limits:
    """How much a fetch may take, and the settings that raise it (named in the error)."""

    max_bytes: int
    seconds: float
    size_setting: str = ""
    time_setting: str = ""


def public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address`` may be fetched from without the operator's say-so."""
    address = unmapped(address)
    return address.is_global and not (address.is_multicast or address.is_reserved or address in SIX_TO_FOUR)


def unmapped(address):
    """The IPv4 address an IPv4-mapped IPv6 one stands for (::ffff:127.0.0.1 is 127.0.0.1), else itself."""
    return address.ipv4_mapped if address.version == 6 and address.ipv4_mapped is not None else address


def allowed(name: str, address) -> bool:
    """Whether ``FASTER_DIFFUSION_ALLOW_HOSTS`` lists the host ``name`` or a network holding ``address``."""
    for entry in os.environ.get(ALLOW_HOSTS, "").split(","):
        entry = entry.strip().strip("[]").lower().rstrip(".")
        if not entry:
            continue
        try:
            if address in ipaddress.ip_network(entry, strict=False):  # False across IPv4 and IPv6
                return True
        except ValueError:  # not an IP or CIDR: a host name
            if entry == name.rstrip("."):
                return True
    return False


def checked_address(name: str, port: int) -> str:
    """The one address a request to ``name`` connects to: looked up here once, refused unless public or allowed.
    A name that does not resolve and one that resolves to a private address get the same answer: the
    client learns nothing of the server's own network, not even which internal names exist."""
    try:
        *_, sockaddr = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)[0]
        address = unmapped(ipaddress.ip_address(sockaddr[0].split("%")[0]))
    except (OSError, UnicodeError, ValueError):
        address = None
    if address is None or not (public(address) or allowed(name, address)):
        raise FetchError(f"{name!r} does not resolve to a public address ({ALLOW_HOSTS} allows others)")
    return str(address)


def fetch(url: str, out, limits: Limits) -> str:
    """Writes the body at ``url`` to the binary file ``out``; returns its Content-Type.
    On a FetchError ``out`` may hold part of the body: the caller throws it away."""
    deadline = time.monotonic() + limits.seconds
    for _ in range(MAX_REDIRECTS + 1):
        conn, watchdog = _connect(url, deadline, limits)
        try:
            response = _get(conn, url)
            if response.status in REDIRECTS and response.headers.get("Location"):
                url = urljoin(url, response.headers["Location"])
                continue
            if response.status != 200:
                raise FetchError(f"HTTP {response.status} from {urlsplit(url).hostname}")
            _copy(response, out, limits)
            if time.monotonic() >= deadline:  # the watchdog cut a body that ends at the close
                raise _too_slow(limits)
            return response.headers.get("Content-Type", "")
        except (OSError, HTTPError, http.client.HTTPException) as err:  # a reset, a bad request line, the watchdog's cut
            if time.monotonic() >= deadline:
                raise _too_slow(limits) from None
            raise FetchError(f"download failed: {type(err).__name__}: {err}") from None
        finally:
            watchdog.cancel()
            conn.close()
    raise FetchError(f"more than {MAX_REDIRECTS} redirects")


def _connect(url: str, deadline: float, limits: Limits) -> tuple[HTTPConnection, Watchdog]:
    """A connection to ``url``'s checked address, and the started watchdog that shuts it at ``deadline``."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise FetchError(f"only http:// and https:// URLs with a host are fetched, not {url[:200]!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:
        raise FetchError(f"bad port: {err}") from None
    address = checked_address(parts.hostname, port)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _too_slow(limits)
    tls = {"server_hostname": parts.hostname} if parts.scheme == "https" else {}  # SNI and certificate: the name
    conn = SCHEMES[parts.scheme](address, port, timeout=min(CONNECT_TIMEOUT, remaining), **tls)
    watchdog = Watchdog(remaining, conn)
    try:
        conn.connect()
    except (OSError, HTTPError) as err:  # refused, unreachable, a bad certificate
        watchdog.cancel()
        conn.close()
        if time.monotonic() >= deadline:
            raise _too_slow(limits) from None
        raise FetchError(f"cannot connect to {parts.hostname} ({type(err).__name__}: {err})") from None
    watchdog.sock = conn.sock  # urllib3 drops conn.sock when the response says it closes; reads go on
    conn.timeout = min(READ_TIMEOUT, remaining)  # each read; the watchdog bounds them all
    return conn, watchdog


def _get(conn: HTTPConnection, url: str):
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.netloc.rpartition("@")[2]  # no credentials are sent
    conn.request("GET", path, headers={"Host": host, "Accept-Encoding": "identity", "User-Agent": "faster-diffusion"},
                 preload_content=False, decode_content=False)  # fmt: skip
    return conn.getresponse()


def _copy(response, out, limits: Limits) -> None:
    length = response.headers.get("Content-Length", "")
    if re.fullmatch(r"\d+", length) and int(length) > limits.max_bytes:
        raise _too_large(limits)
    written = 0
    while chunk := response.read(CHUNK):
        written += len(chunk)
        if written > limits.max_bytes:
            raise _too_large(limits)
        out.write(chunk)


def _too_large(limits: Limits) -> FetchError:
    setting = f" ({limits.size_setting})" if limits.size_setting else ""
    return FetchError(f"larger than {limits.max_bytes / 2**20:g} MiB, the most this server downloads{setting}")


def _too_slow(limits: Limits) -> FetchError:
    setting = f" ({limits.time_setting})" if limits.time_setting else ""
    return FetchError(f"took longer than {limits.seconds:g} s, the most this server waits for a download{setting}")


class Watchdog(threading.Timer):
    """Shuts the connection's socket after ``seconds``, so that a read blocked on it sees the end of the
    stream and the fetch reports the deadline. Started at once: urllib3 sets ``conn.sock`` to the plain
    socket before the TLS handshake, so a slow handshake is cut too."""

    def __init__(self, seconds: float, conn: HTTPConnection):
        super().__init__(seconds, self.shut)
        self.conn, self.sock, self.daemon = conn, None, True
        self.start()

    def shut(self) -> None:
        for sock in (self.conn.sock, self.sock):
            if sock is not None:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
