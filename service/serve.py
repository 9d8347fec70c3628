"""The service's entry point: Cog's HTTP server (coglet) behind a guard that no single request can wedge.

``python -m service.serve [--host HOST]`` (port from ``PORT``, default 5000; other arguments go to coglet)
is what ``make serve`` and the Dockerfile run. It starts ``python -m cog.server.http`` on a private
loopback port and forwards every request to it byte for byte, except that it

* refuses a prediction or training id outside ``[A-Za-z0-9_-]{1,128}`` (in the path of
  ``/predictions/{id}...`` / ``/trainings/{id}...``, percent-decoded, or in the JSON body's ``"id"``)
  with HTTP 422 before coglet sees it. coglet 0.23.1 makes a directory named after the id: when that
  fails (a NUL byte, a name over 255 bytes) the prediction slot is never freed and every later
  prediction gets 409 for the life of the process; an id such as ``../../x`` makes directories
  outside its own (docs/service.md);
* fetches the URL of a file input (``image``, ``mask``: ``FILE_INPUTS``) itself, by ``service.fetch``'s
  rules (public addresses only unless ``FASTER_DIFFUSION_ALLOW_HOSTS`` lists the host, every redirect
  checked, at most ``IMAGE_LIMITS``), and hands coglet the file as a ``data:`` URI. coglet 0.23.1 would
  fetch any ``http(s)://`` URL itself, loopback and redirects included, and would read any other
  string as a path on the server; those are refused with HTTP 422 naming the input (docs/service.md);
* restarts coglet when it logs that a prediction slot is lost (dropped while in use, or poisoned):
  the same wedge from any other cause, a full disk say. Requests meanwhile get 503;
* starts coglet (and so its worker) with ``service.memory.WORKER_ENVIRONMENT`` for what the
  environment does not set: the allocator and cache bounds that keep the worker's memory flat
  across image sizes (docs/operations.md).

It exits with coglet's exit status when coglet exits by itself, and hands SIGTERM / SIGINT on to it.
Each forwarded request gets ``Connection: close``; bodies other than a new prediction's stream through.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import sys
from urllib.parse import unquote_to_bytes, urlsplit

from service.fetch import FetchError, Limits, fetch
from service.memory import worker_environment

VALID_ID = re.compile(rb"[A-Za-z0-9_-]{1,128}")
ID_IN_PATH = re.compile(rb"/(?:predictions|trainings)/([^/]*)")
# the requests that create a prediction (or training), whose JSON body may carry an "id"
CREATES = {b"POST": re.compile(rb"/(?:predictions|trainings)/?"), b"PUT": re.compile(rb"/(?:predictions|trainings)/[^/]+/?")}
# coglet's log lines when a prediction slot is lost for good (with one slot: every prediction gets 409)
WEDGED = (b"Slot dropped while InUse", b"Slot poisoned")
MAX_HEAD = 64 * 1024
MAX_BODY = 256 * 1024 * 1024  # a new prediction's JSON body is read whole to check its "id"
HEAD_TIMEOUT = 60  # seconds to send the request line and headers
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection"}
FILE_INPUTS = ("image", "mask")  # the predictor's Path inputs (format "uri" in .cog/openapi_schema.json)
IMAGE_LIMITS = Limits(max_bytes=50 * 2**20, seconds=60)  # an image URL; a data: URI is bounded by MAX_BODY
MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_path_id(path: bytes) -> bool:
    """True when the path names a prediction or training whose id, percent-decoded, is not a plain id.
    Matched on the raw and on the decoded path, so neither %2F in the id nor an encoded route slips by."""
    for candidate in (path, unquote_to_bytes(path)):
        match = ID_IN_PATH.match(candidate)
        if match and not VALID_ID.fullmatch(unquote_to_bytes(match[1])):
            return True
    return False


def bad_body_id(body: bytes) -> str | None:
    """Why a new prediction's body is refused, or None. A body that is not JSON is refused too: coglet
    would refuse it anyway, and one that Python cannot read must not reach coglet unchecked."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError) as error:
        return f"the body is not JSON: {error}"
    prediction_id = request.get("id") if isinstance(request, dict) else None
    if isinstance(prediction_id, str) and not VALID_ID.fullmatch(prediction_id.encode("utf-8", "surrogatepass")):
        return f"id must match {VALID_ID.pattern.decode()}"
    return None


class InputRefused(ValueError):
    """A file input the guard does not pass on to coglet; the message starts with the input's name."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field


def inline_file_inputs(body: bytes) -> bytes:
    """The body of a new prediction as coglet gets it: each file input's ``http(s)://`` URL fetched here
    and replaced by a ``data:`` URI; ``data:`` URIs kept; anything else (a path on the server, ``file://``)
    refused (``InputRefused``). The body is always written out again from what was checked, so coglet
    cannot read a duplicate key differently. Call it on a body ``bad_body_id`` passed."""
    request = json.loads(body)
    inputs = request.get("input") if isinstance(request, dict) else None
    if isinstance(inputs, dict):
        for field in FILE_INPUTS:
            value = inputs.get(field)
            if not isinstance(value, str):  # unset, or not a string: coglet's own validation answers
                continue
            scheme = urlsplit(value).scheme  # what cog.types.Path.validate reads
            if scheme in ("http", "https"):
                inputs[field] = fetched_data_uri(field, value)
            elif scheme != "data":
                raise InputRefused(field, "this server takes only data: URIs and http:// or https:// URLs")
    return json.dumps(request).encode()


def fetched_data_uri(field: str, url: str) -> str:
    out = io.BytesIO()
    try:
        media_type = fetch(url, out, IMAGE_LIMITS).split(";")[0].strip()
    except FetchError as err:
        raise InputRefused(field, f"{url[:200]!r}: {err}") from None
    media_type = media_type if MEDIA_TYPE.fullmatch(media_type) else "application/octet-stream"
    return f"data:{media_type};base64,{base64.b64encode(out.getvalue()).decode()}"


def response(status: str, payload: dict) -> bytes:
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    return head.encode() + body


def refusal(loc: list[str], message: str) -> bytes:
    """A 422 in the shape of the schema's HTTPValidationError."""
    return response("422 Unprocessable Entity", {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]})


class Guard:
    def __init__(self, coglet_args: list[str]):
        self.coglet_args = coglet_args
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.restarting = False
        self.stopping = False  # a signal came: coglet's exit is ours, no restart
        self.handlers: set[asyncio.Task] = set()

    # -- coglet -------------------------------------------------------------------------------------------

    async def start_coglet(self) -> None:
        self.port = free_port()
        env = dict(worker_environment(), PORT=str(self.port))  # coglet's worker inherits it
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1", *self.coglet_args,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: a restart takes its worker down too
        )
        log(f"coglet (pid {self.proc.pid}) on 127.0.0.1:{self.port}")

    async def stop_coglet(self, grace: float = 10) -> None:
        proc = self.proc
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), grace)
        except ProcessLookupError:
            pass
        except asyncio.TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    def pass_on(self, sig: int) -> None:
        self.stopping = True
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(sig)

    async def supervise(self) -> int:
        """Copies coglet's output to ours; restarts coglet when it wedges. Returns its exit status."""
        await self.start_coglet()
        while True:
            tail = b""
            while chunk := await self.proc.stdout.read(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                if any(line in tail + chunk for line in WEDGED):
                    break
                tail = chunk[-max(map(len, WEDGED)):]
            else:  # coglet exited by itself (or by a signal we passed on)
                return await self.proc.wait()
            if self.stopping:
                return await self.proc.wait()
            log("coglet lost a prediction slot for good (it would answer 409 from now on): restarting it")
            self.restarting = True
            await self.stop_coglet()
            await self.start_coglet()
            self.restarting = False

    # -- the front ----------------------------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.handlers.add(task)  # asyncio keeps only weak references to a connection's task
        try:
            await self.forward(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        request_line, *header_lines = head[:-4].split(b"\r\n")
        try:
            method, target, _ = request_line.split(b" ", 2)
        except ValueError:
            writer.write(response("400 Bad Request", {"error": "malformed request line"}))
            return await writer.drain()
        path = urlsplit(target).path
        headers = [line for line in header_lines if line.split(b":", 1)[0].strip().lower() not in HOP_BY_HOP]
        if bad_path_id(path):
            writer.write(refusal(["path", "id"], f"prediction id must match {VALID_ID.pattern.decode()}"))
            return await writer.drain()

        body = b""
        if method in CREATES and CREATES[method].fullmatch(path):  # a new prediction: check the body's id
            headers, body = await read_body(reader, writer, headers)
            if body is None:
                writer.write(response("413 Content Too Large", {"error": f"a prediction body is at most {MAX_BODY} bytes"}))
                return await writer.drain()
            if why := bad_body_id(body):
                writer.write(refusal(["body", "id"], why))
                return await writer.drain()
            try:  # in a thread: the guard keeps answering while it downloads
                body = await asyncio.to_thread(inline_file_inputs, body)
            except InputRefused as error:
                writer.write(refusal(["body", "input", error.field], str(error)))
                return await writer.drain()
            headers = [line for line in headers if not line.lower().startswith(b"content-length:")]
            headers.append(b"Content-Length: %d" % len(body))

        try:
            if self.restarting:
                raise ConnectionRefusedError("coglet is restarting")
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:  # coglet is starting (not listening yet) or restarting
            writer.write(response("503 Service Unavailable", {"status": "STARTING", "error": "coglet is starting"}))
            return await writer.drain()

        up_writer.write(b"\r\n".join([request_line, *headers, b"Connection: close", b"", b""]) + body)
        upload = asyncio.ensure_future(pipe(reader, up_writer))  # the rest of a streamed body, if any
        download = asyncio.ensure_future(pipe(up_reader, writer))
        try:  # done when coglet has answered, or when the client hangs up (coglet then sees us hang up too)
            await asyncio.wait([upload, download], return_when=asyncio.FIRST_COMPLETED)
        finally:
            upload.cancel()
            download.cancel()
            up_writer.close()


async def read_body(reader, writer, headers: list[bytes]) -> tuple[list[bytes], bytes | None]:
    """Reads a request body whole (Content-Length or chunked) and returns the headers to send it with."""
    fields = {}
    for line in headers:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    if fields.get(b"expect") == b"100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if b"chunked" in fields.get(b"transfer-encoding", b""):
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            if len(body) + size > MAX_BODY:
                return headers, None
            body += (await reader.readexactly(size + 2))[:-2]
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
    else:
        length = int(fields.get(b"content-length", b"0"))
        if length > MAX_BODY:
            return headers, None
        body = await reader.readexactly(length)
    kept = [line for line in headers if line.split(b":", 1)[0].strip().lower() not in (b"content-length", b"transfer-encoding", b"expect")]
    return [*kept, b"Content-Length: %d" % len(body)], bytes(body)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:  # either side went away: the other is closed by forward()
        pass


def log(message: str) -> None:
    print(f"[service.serve] {message}", flush=True)


async def serve(host: str, port: int, coglet_args: list[str]) -> int:
    guard = Guard(coglet_args)
    server = await asyncio.start_server(guard.handle, host, port, limit=MAX_HEAD)
    log(f"listening on {host}:{port}")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # coglet decides how to stop (--await-explicit-shutdown)
        loop.add_signal_handler(sig, guard.pass_on, sig)
    try:
        return await guard.supervise()
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all, as coglet)")
    args, coglet_args = parser.parse_known_args()
    sys.exit(asyncio.run(serve(args.host, int(os.environ.get("PORT", "5000")), coglet_args)))


if __name__ == "__main__":
    main()
