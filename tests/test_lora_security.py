"""service/lora.py and service/fetch.py: what a client's ``lora_weights`` may make the server read or fetch.

Traffic goes to loopback only. Private and metadata addresses are tested through the address check
itself or through a resolver patched in-process, with connecting made to fail the test: the
refusal must come before any connection.
"""

from __future__ import annotations

import http.server
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from service import fetch as F
from service import lora as L

ROOT = Path(__file__).resolve().parent.parent
LORA_FILE = ROOT / "weights" / "tiny-shapes-orange-lora" / "pytorch_lora_weights.safetensors"
SETTINGS = (F.ALLOW_HOSTS, L.LORA_DIR, L.MAX_MB, L.TIMEOUT_S, L.CACHE_MAX_MB)


class FileServer:
    """An HTTP server on a loopback address, in a thread. ``routes`` maps a path to bytes (200), to
    ``("redirect", url)`` (302), or to a function of the request handler that answers itself; other
    paths get 404. ``seen`` lists the paths asked for, in order."""

    def __init__(self, routes: dict | None = None, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.routes, self.seen = dict(routes or {}), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.seen.append(self.path)
                route = server.routes.get(self.path)
                try:
                    if callable(route):
                        route(self)
                    elif isinstance(route, tuple):
                        self.send_response(302)
                        self.send_header("Location", route[1])
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    elif route is None:
                        self.send_error(404)
                    else:
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(route)))
                        self.end_headers()
                        self.wfile.write(route)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: the point of some tests
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str | None = None, scheme: str = "http") -> str:
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def drip(size: int, every: float, length: bool = True):
    """A route that sends ``size`` bytes one at a time, ``every`` seconds apart."""

    def route(handler):
        handler.send_response(200)
        if length:
            handler.send_header("Content-Length", str(size))
        handler.end_headers()
        for _ in range(size):
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(every)

    return route


def unsized(body: bytes):
    """A route that sends ``body`` without Content-Length, its end marked by closing the connection."""

    def route(handler):
        handler.protocol_version = "HTTP/1.0"
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(body)
        handler.close_connection = True

    return route


@pytest.fixture(autouse=True)
def default_environment(monkeypatch, tmp_path):
    """No operator setting; the download cache in tmp_path."""
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FASTER_DIFFUSION_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def no_connections(monkeypatch):
    """Any outgoing connection fails the test (servers in this process still accept)."""
    attempts = []

    def connect(sock, address):
        attempts.append(address)
        raise AssertionError(f"a connection was attempted to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    yield attempts
    assert attempts == []


def resolving(monkeypatch, names: dict[str, str]):
    """A resolver that answers ``names`` (host -> address) and nothing else."""

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, "not in the test's resolver")
        address = ipaddress.ip_address(names[host])
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        return [(family, socket.SOCK_STREAM, 6, "", (str(address), port))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def lora_files() -> list[Path]:
    """The files in the LoRA download cache, staging files included."""
    folder = Path(os.environ["FASTER_DIFFUSION_CACHE"]) / "lora"
    return sorted(folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------------------
# the address check


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.0.0.2", "0.0.0.0", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254",
        "100.64.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::", "::1", "::ffff:127.0.0.1",
        "::ffff:169.254.169.254", "fe80::1", "fd00::1", "ff02::1", "::7f00:1", "64:ff9b::7f00:1", "2002:7f00:1::1",
    ],
)
def test_non_public_addresses_are_refused(address):
    assert not F.public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert F.public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "entries, name, address, allowed",
    [
        ("127.0.0.1", "127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "localhost", "127.0.0.1", True),  # an IP entry matches the address looked up
        ("127.0.0.1", "127.0.0.2", "127.0.0.2", False),
        ("127.0.0.0/30", "127.0.0.2", "127.0.0.2", True),
        (" 10.0.0.0/8 , mirror.internal ", "mirror.internal", "10.9.9.9", True),
        ("mirror.internal", "MIRROR.internal.", "10.9.9.9", True),
        ("localhost", "localhost", "127.0.0.1", True),
        ("localhost", "127.0.0.1", "127.0.0.1", False),  # a name entry matches the name only
        ("mirror.internal", "mirror.internal.evil.example", "10.9.9.9", False),
        ("::1", "::1", "::1", True),
        ("[::1]", "::1", "::1", True),
        ("::1", "127.0.0.1", "127.0.0.1", False),
        ("", "127.0.0.1", "127.0.0.1", False),
    ],
)
def test_allow_list_entries(monkeypatch, entries, name, address, allowed):
    monkeypatch.setenv(F.ALLOW_HOSTS, entries)
    assert F.allowed(name.lower(), ipaddress.ip_address(address)) is allowed


# ---------------------------------------------------------------------------------------------------------
# local paths


def test_local_paths_and_file_urls_are_refused_alike_whether_or_not_they_exist(tmp_path):
    sources = [
        "/etc/passwd", "/nonexistent/passwd", "file:///etc/passwd", "file:///nonexistent/passwd",
        str(LORA_FILE), str(LORA_FILE.parent), LORA_FILE.as_uri(), "weights/tiny-shapes-orange-lora",
        "file://otherhost/etc/passwd", "ftp://example.com/lora.safetensors", "~/lora.safetensors",
    ]
    messages = set()
    for source in sources:
        with pytest.raises(ValueError) as err:
            L.resolve_lora(source)
        messages.add(str(err.value))
    assert messages == {"lora_weights: this server takes only http:// or https:// URLs"}


@pytest.fixture
def lora_dir(monkeypatch, tmp_path) -> Path:
    """FASTER_DIFFUSION_LORA_DIR with the bundled LoRA in it, and a copy of it outside."""
    folder = tmp_path / "loras"
    (folder / "orange").mkdir(parents=True)
    shutil.copy(LORA_FILE, folder / "orange" / "orange.safetensors")
    shutil.copy(LORA_FILE, tmp_path / "outside.safetensors")
    monkeypatch.setenv(L.LORA_DIR, str(folder))
    return folder


def test_a_lora_inside_the_lora_dir_is_accepted(lora_dir):
    inside = lora_dir / "orange" / "orange.safetensors"
    (lora_dir / "alias.safetensors").symlink_to(inside)  # a symlink that stays inside
    for source in (str(inside), inside.as_uri(), "orange/orange.safetensors", "orange", str(lora_dir / "orange"),
                   "alias.safetensors", "orange/../orange/orange.safetensors"):  # fmt: skip
        assert L.resolve_lora(source) == inside.resolve(), source
    with pytest.raises(ValueError, match="lora_weights: 'missing.safetensors': no such file in FASTER_DIFFUSION_LORA_DIR"):
        L.resolve_lora("missing.safetensors")


def test_escapes_from_the_lora_dir_are_refused_alike(lora_dir, tmp_path):
    (lora_dir / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (lora_dir / "linked-dir").symlink_to(tmp_path)
    (lora_dir / "out").mkdir()
    (lora_dir / "out" / "one.safetensors").symlink_to(tmp_path / "outside.safetensors")
    sources = [
        "../outside.safetensors", str(lora_dir / ".." / "outside.safetensors"), "orange/../../outside.safetensors",
        "link.safetensors", "linked-dir/outside.safetensors", "out", str(tmp_path / "outside.safetensors"),
        (tmp_path / "outside.safetensors").as_uri(), "/etc/passwd", "/nonexistent/passwd", "../nonexistent.safetensors",
        "orange/orange.safetensors\0",
    ]
    messages = set()
    for source in sources:
        with pytest.raises(ValueError) as err:
            L.resolve_lora(source)
        messages.add(str(err.value))
    assert messages == {"lora_weights: this server takes only http:// or https:// URLs or files in its FASTER_DIFFUSION_LORA_DIR"}


# ---------------------------------------------------------------------------------------------------------
# URLs: refused before any connection


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "0x7f000001", "2130706433", "127.1", "[::ffff:127.0.0.1]", "0.0.0.0"])
def test_loopback_urls_are_refused_without_a_connection(host, no_connections):
    with FileServer({"/lora.safetensors": LORA_FILE.read_bytes()}) as server:
        with pytest.raises(ValueError, match=r"^lora_weights: .*does not resolve to a public address"):
            L.resolve_lora(server.url("/lora.safetensors", host=host))
    assert server.seen == []


@pytest.mark.parametrize("name, address", [("metadata.test", "169.254.169.254"), ("intranet.test", "10.0.0.1"),
                                           ("v6.test", "fd00::1"), ("mapped.test", "::ffff:10.0.0.1")])  # fmt: skip
def test_names_resolving_to_private_addresses_are_refused_without_a_connection(monkeypatch, no_connections, name, address):
    resolving(monkeypatch, {name: address})
    with pytest.raises(ValueError, match=r"^lora_weights: .*does not resolve to a public address"):
        L.resolve_lora(f"http://{name}/latest/meta-data/lora.safetensors")


def test_a_name_that_does_not_resolve_gets_the_same_answer(monkeypatch, no_connections):
    resolving(monkeypatch, {"intranet.test": "10.0.0.1"})
    answers = set()
    for name in ("intranet.test", "nonexistent.test"):
        with pytest.raises(ValueError) as err:
            L.resolve_lora(f"http://{name}/x.safetensors")
        answers.add(str(err.value).replace(name, "NAME"))
    assert len(answers) == 1, answers


def test_the_address_checked_is_the_address_connected_to(monkeypatch):
    """One lookup of the name: a resolver that answers a public address first and loopback after is not asked
    twice (urllib3 looks the address literal up again, which asks no resolver)."""
    answers = iter(["93.184.215.14", "127.0.0.1"])
    names, connected = [], []

    def getaddrinfo(host, port, *args, **kwargs):
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            names.append(host)
            address = next(answers)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    def connect(sock, address):
        connected.append(address)
        raise ConnectionRefusedError("the test stops here")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(ValueError, match="lora_weights: .*cannot connect"):
        L.resolve_lora("http://rebinding.test/lora.safetensors")
    assert names == ["rebinding.test"]
    assert [address[0] for address in connected] == ["93.184.215.14"]


# ---------------------------------------------------------------------------------------------------------
# URLs the operator allows


@pytest.fixture
def allow_loopback(monkeypatch):
    monkeypatch.setenv(F.ALLOW_HOSTS, "127.0.0.1")


def test_an_allowed_loopback_server_serves_the_lora_once(allow_loopback, tmp_path):
    with FileServer({"/lora.safetensors": LORA_FILE.read_bytes()}) as server:
        first = L.resolve_lora(server.url("/lora.safetensors"))
        assert first.read_bytes() == LORA_FILE.read_bytes()
        assert L.resolve_lora(server.url("/lora.safetensors")) == first  # from the cache
        assert L.resolve_lora(server.url("/lora.safetensors", host="localhost")) != first  # another URL, same address
    assert server.seen == ["/lora.safetensors", "/lora.safetensors"]


def test_redirects_are_followed_only_to_allowed_addresses(allow_loopback, no_connections_but_loopback):
    with FileServer({"/real.safetensors": LORA_FILE.read_bytes()}, host="127.0.0.2") as other, FileServer() as server:
        server.routes.update({
            "/lora.safetensors": ("redirect", "/moved.safetensors"),  # relative, same host
            "/moved.safetensors": LORA_FILE.read_bytes(),
            "/elsewhere.safetensors": ("redirect", other.url("/real.safetensors")),
            "/file.safetensors": ("redirect", LORA_FILE.as_uri()),
            "/loop.safetensors": ("redirect", "/loop.safetensors"),
        })
        followed = L.resolve_lora(server.url("/lora.safetensors"))
        assert followed.read_bytes() == LORA_FILE.read_bytes()
        with pytest.raises(ValueError, match=r"lora_weights: .*'127\.0\.0\.2' does not resolve to a public address"):
            L.resolve_lora(server.url("/elsewhere.safetensors"))
        with pytest.raises(ValueError, match="lora_weights: .*only http:// and https:// URLs"):
            L.resolve_lora(server.url("/file.safetensors"))
        with pytest.raises(ValueError, match="lora_weights: .*more than 5 redirects"):
            L.resolve_lora(server.url("/loop.safetensors"))
    assert other.seen == []
    assert no_connections_but_loopback == []
    assert lora_files() == [followed]  # the refusals left nothing


@pytest.fixture
def no_connections_but_loopback(monkeypatch):
    """Connections to 127.0.0.1 go through; any other fails the test (and is listed)."""
    others, real = [], socket.socket.connect

    def connect(sock, address):
        if address[0] != "127.0.0.1":
            others.append(address)
            raise AssertionError(f"a connection was attempted to {address}")
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return others


def test_http_errors_name_the_status(allow_loopback):
    with FileServer() as server:
        with pytest.raises(ValueError, match="lora_weights: .*HTTP 404"):
            L.resolve_lora(server.url("/missing.safetensors"))
        with pytest.raises(ValueError, match="lora_weights: .*download failed: InvalidURL"):
            L.resolve_lora(server.url("/a b\0.safetensors"))  # http.client refuses the request line
        with pytest.raises(ValueError, match="lora_weights: .*cannot connect"):
            L.resolve_lora("http://127.0.0.1:9/lora.safetensors")  # the discard port: nobody listens


# ---------------------------------------------------------------------------------------------------------
# limits


@pytest.mark.parametrize("route", [b"x" * (5 * 2**20), unsized(b"x" * (5 * 2**20))], ids=["sized", "unsized"])
def test_a_download_over_the_size_cap_fails_and_leaves_nothing(monkeypatch, allow_loopback, tmp_path, route):
    monkeypatch.setenv(L.MAX_MB, "1")
    with FileServer({"/big.safetensors": route}) as server:
        with pytest.raises(ValueError, match=r"lora_weights: .*larger than 1 MiB.*FASTER_DIFFUSION_LORA_MAX_MB"):
            L.resolve_lora(server.url("/big.safetensors"))
    assert lora_files() == []


@pytest.mark.parametrize("route", [drip(1000, 0.05), drip(1000, 0.05, length=False), lambda handler: time.sleep(5)],
                         ids=["body", "unsized", "no-headers"])  # fmt: skip
def test_a_download_over_the_time_limit_fails_and_leaves_nothing(monkeypatch, allow_loopback, tmp_path, route):
    monkeypatch.setenv(L.TIMEOUT_S, "1")
    with FileServer({"/slow.safetensors": route}) as server:
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"lora_weights: .*took longer than 1 s.*FASTER_DIFFUSION_LORA_TIMEOUT_S"):
            L.resolve_lora(server.url("/slow.safetensors"))
        assert time.monotonic() - started < 3
    assert lora_files() == []


def test_the_lora_cache_drops_the_least_recently_used_first(monkeypatch, allow_loopback, tmp_path):
    size = LORA_FILE.stat().st_size
    monkeypatch.setenv(L.CACHE_MAX_MB, str(2.5 * size / 2**20))  # room for two
    with FileServer({f"/{name}.safetensors": LORA_FILE.read_bytes() for name in "abc"}) as server:
        a = L.resolve_lora(server.url("/a.safetensors"))
        os.utime(a, (time.time() - 20,) * 2)
        b = L.resolve_lora(server.url("/b.safetensors"))
        os.utime(b, (time.time() - 10,) * 2)
        assert L.resolve_lora(server.url("/a.safetensors")) == a  # used again: now the most recent
        c = L.resolve_lora(server.url("/c.safetensors"))
    assert lora_files() == sorted([a, c])
    monkeypatch.setenv(L.CACHE_MAX_MB, "0")  # smaller than one file: the one just downloaded stays
    with FileServer({"/d.safetensors": LORA_FILE.read_bytes()}) as server:
        d = L.resolve_lora(server.url("/d.safetensors"))
    assert lora_files() == [d]


def test_a_bad_download_is_not_cached(allow_loopback, tmp_path):
    with FileServer({"/bad.safetensors": b"not safetensors"}) as server:
        with pytest.raises(ValueError, match="lora_weights.*not a safetensors file"):
            L.resolve_lora(server.url("/bad.safetensors"))
    assert lora_files() == []


# ---------------------------------------------------------------------------------------------------------
# https: the connection goes to the checked address, the certificate is checked against the name


@pytest.fixture
def localhost_tls(tmp_path, monkeypatch) -> ssl.SSLContext:
    """A server context with a self-signed certificate for "localhost", which the client trusts."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_https_keeps_the_certificate_check_on_the_name(monkeypatch, localhost_tls):
    monkeypatch.setenv(F.ALLOW_HOSTS, "localhost,127.0.0.1")
    with FileServer({"/lora.safetensors": LORA_FILE.read_bytes()}, tls=localhost_tls) as server:
        path = L.resolve_lora(server.url("/lora.safetensors", host="localhost", scheme="https"))
        assert path.read_bytes() == LORA_FILE.read_bytes()
        with pytest.raises(ValueError, match="lora_weights: .*cannot connect.*(certificate|hostname|match)"):
            L.resolve_lora(server.url("/lora.safetensors", host="127.0.0.1", scheme="https"))  # not the certificate's name
