"""service/serve.py, the service's entry point: no single request wedges the server.

coglet 0.23.1 loses its only prediction slot for good on a prediction id it cannot make a directory of
(``PUT /predictions/%00x``): every later prediction gets 409 (docs/service.md). The entry point refuses
such ids before coglet sees them and restarts coglet if it wedges anyway. The end-to-end tests start
the real entry point on a free loopback port with the bundled model (or conftest's tiny pipeline).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time

import pytest
import requests
from conftest import ROOT, Served, entry_point
from PIL import Image
from test_lora_security import SETTINGS, FileServer, no_connections, resolving  # noqa: F401 (a fixture)

from service.serve import FILE_INPUTS, InputRefused, bad_body_id, bad_path_id, inline_file_inputs

STARTUP_TIMEOUT = 240  # seconds; torch and diffusers import slowly on a busy 2-core machine
RECOVERY_TIMEOUT = 90  # what an operator can expect: a normal prediction within 90 s of the bad request
SMALL = {"prompt": "a red square in the center", "num_inference_steps": 4, "seed": 3}
ALLOW_HOSTS = "FASTER_DIFFUSION_ALLOW_HOSTS"


def png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), "white").save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(raw: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(raw).decode()}"


@pytest.mark.parametrize(
    "path, bad",
    [
        (b"/predictions/pred_18ed59cbfefb9b45", False),
        (b"/predictions/abc-DEF_9/cancel", False),
        (b"/health-check", False),
        (b"/predictions", False),
        (b"/predictions/%00x", True),
        (b"/predictions/%00x/cancel", True),
        (b"/trainings/%00x", True),
        (b"/predictions/" + b"a" * 129, True),
        (b"/predictions/a%2Fb", True),  # coglet would make the directory a/b
        (b"/predictions/..", True),
        (b"/predictions/", True),
        (b"/%70redictions/%00x", True),  # an encoded route still names the prediction
    ],
)
def test_path_ids(path, bad):
    assert bad_path_id(path) is bad


@pytest.mark.parametrize(
    "body, bad",
    [
        (b'{"input": {"prompt": "x"}}', False),
        (b'{"id": "my-id_1", "input": {}}', False),
        (b'{"id": null, "input": {}}', False),
        (b'{"id": 5, "input": {}}', False),  # not a string: coglet's own validation answers
        (b'{"id": "\\u0000x", "input": {}}', True),
        (b'{"id": "../../x", "input": {}}', True),
        (b'{"id": "\\ud800", "input": {}}', True),
        (b'{"id": "' + b"b" * 300 + b'"}', True),
        (b'{"input": ', True),
        (b"", True),
    ],
)
def test_body_ids(body, bad):
    assert (bad_body_id(body) is not None) is bad


# ---------------------------------------------------------------------------------------------------------
# image and mask: coglet would fetch their URLs itself (any address) and read any other string as a server path


def test_file_inputs_are_the_schemas_uri_inputs():
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    inputs = schema["components"]["schemas"]["Input"]["properties"]
    assert set(FILE_INPUTS) == {name for name, spec in inputs.items() if spec.get("format") == "uri"}


@pytest.fixture
def default_environment(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)


def request_body(**inputs) -> bytes:
    return json.dumps({"input": {**SMALL, **inputs}}).encode()


@pytest.mark.parametrize("field", FILE_INPUTS)
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "0x7f000001"])
def test_file_input_urls_to_loopback_are_refused_without_a_connection(default_environment, no_connections, field, host):
    with FileServer({"/img.png": png()}) as files:
        with pytest.raises(InputRefused, match=f"^{field}: .*does not resolve to a public address") as refused:
            inline_file_inputs(request_body(**{field: files.url("/img.png", host=host)}))
    assert refused.value.field == field and files.seen == []


@pytest.mark.parametrize("address", ["169.254.169.254", "10.0.0.1"])
def test_file_input_urls_to_private_names_are_refused_without_a_connection(default_environment, no_connections, monkeypatch, address):
    resolving(monkeypatch, {"private.test": address})
    with pytest.raises(InputRefused, match="^image: .*does not resolve to a public address"):
        inline_file_inputs(request_body(image="http://private.test/img.png"))


@pytest.mark.parametrize("value", ["/etc/passwd", "/nonexistent/x.png", "weights/x.png", "file:///etc/passwd", "ftp://example.com/x.png"])
def test_file_inputs_that_are_not_urls_are_refused_alike(default_environment, value):
    for field in FILE_INPUTS:
        with pytest.raises(InputRefused) as refused:
            inline_file_inputs(request_body(**{field: value}))
        assert str(refused.value) == f"{field}: this server takes only data: URIs and http:// or https:// URLs"


def test_data_uris_pass_and_allowed_urls_are_sent_on_as_data_uris(monkeypatch):
    monkeypatch.setenv(ALLOW_HOSTS, "127.0.0.1")
    picture = png()

    def typed(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(len(picture)))
        handler.end_headers()
        handler.wfile.write(picture)

    with FileServer(host="127.0.0.2") as other, FileServer({"/img.png": typed, "/raw": picture}) as files:
        files.routes.update({"/moved": ("redirect", "/img.png"), "/away": ("redirect", other.url("/img.png"))})
        body = json.loads(inline_file_inputs(request_body(image=files.url("/moved"), mask=files.url("/raw"))))
        assert body["input"]["image"] == data_uri(picture)
        assert body["input"]["mask"] == data_uri(picture, "application/octet-stream")
        assert {k: v for k, v in body["input"].items() if k not in FILE_INPUTS} == SMALL
        with pytest.raises(InputRefused, match=r"^image: .*'127\.0\.0\.2' does not resolve to a public address"):
            inline_file_inputs(request_body(image=files.url("/away")))
    assert other.seen == []
    kept = request_body(image=data_uri(picture), mask=None)
    assert json.loads(inline_file_inputs(kept)) == json.loads(kept)
    # the body coglet gets is the one checked: a duplicate key cannot carry another URL past the guard
    duplicate = b'{"input": {"image": "http://127.0.0.2/x.png", "image": "DATA"}, "input": {"prompt": "x"}}'
    assert json.loads(inline_file_inputs(duplicate)) == {"input": {"prompt": "x"}}
    assert inline_file_inputs(duplicate).count(b"127.0.0.2") == 0


def test_make_serve_and_the_docker_image_run_the_guard():
    makefile = (ROOT / "Makefile").read_text()
    serve = re.search(r"^serve:.*?(?=^\S|\Z)", makefile, re.M | re.S)[0]
    assert "python -m service.serve" in serve and "cog.server.http" not in serve
    assert 'CMD ["python", "-m", "service.serve"]' in (ROOT / "Dockerfile").read_text()


# ---------------------------------------------------------------------------------------------------------
# the real entry point


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    """`python -m service.serve` as `make serve` runs it."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cache = str(log_path.parent / "cache")
    environ = dict(os.environ, COG_WEIGHTS=str(model_dir), FASTER_DIFFUSION_CACHE=cache, OMP_NUM_THREADS="1")  # see tests/test_service.py
    for name in SETTINGS:  # the default environment: no host allowed, no LoRA directory
        environ.pop(name, None)
    with entry_point(ROOT, log_path, environ, STARTUP_TIMEOUT) as server:
        yield server


def predict(server: Served, path: str = "/predictions", **request) -> dict:
    """A prediction once the server is READY (coglet frees its slot a few ms after answering the last one)."""
    server.wait_ready(30)
    method = requests.put if path != "/predictions" else requests.post
    response = method(f"{server.url}{path}", json={"input": SMALL, **request}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "succeeded", body.get("error")
    return body


def test_a_nul_prediction_id_is_refused_and_the_next_prediction_succeeds(served):
    url = served.url
    refused = requests.put(f"{url}/predictions/%00x", json={"input": SMALL}, timeout=30)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"] == ["path", "id"]
    refused = requests.post(f"{url}/predictions", json={"id": "\u0000x", "input": SMALL}, timeout=30)
    assert refused.status_code == 422, refused.text
    assert requests.get(f"{url}/health-check", timeout=10).json()["status"] == "READY"
    assert predict(served)["output"][0].startswith("data:image/png;base64,")
    # ids of the client's choosing still work, by PUT and POST
    assert predict(served, "/predictions/client-id_1")["id"] == "client-id_1"
    assert predict(served, id="client-id_2")["id"] == "client-id_2"
    assert "restarting" not in served.log()


def test_a_wedged_coglet_is_restarted(served):
    """The bad request sent to coglet's private port, past the guard: the watchdog must bring it back."""
    coglet_port = re.findall(r"\[service\.serve\] coglet \(pid \d+\) on 127\.0\.0\.1:(\d+)", served.log())[-1]
    wedging = requests.put(f"http://127.0.0.1:{coglet_port}/predictions/%00x", json={"input": SMALL}, timeout=30)
    assert "NUL byte" in wedging.json()["error"]  # coglet's own answer: it is wedged from here on
    started = time.monotonic()
    served.wait_ready(RECOVERY_TIMEOUT)
    predict(served)
    assert time.monotonic() - started < RECOVERY_TIMEOUT
    assert "restarting it" in served.log()


def test_file_input_urls_to_loopback_do_not_reach_it(served):
    with FileServer({"/img.png": png()}) as files:
        for field, host in [("image", "127.0.0.1"), ("mask", "localhost"), ("image", "0x7f000001"), ("mask", "[::1]")]:
            inputs = {**SMALL, "image": data_uri(png()), field: files.url("/img.png", host=host)}
            refused = requests.post(f"{served.url}/predictions", json={"input": inputs}, timeout=60)
            assert refused.status_code == 422, refused.text
            (detail,) = refused.json()["detail"]
            assert detail["loc"] == ["body", "input", field] and detail["msg"].startswith(f"{field}: "), detail
        refused = requests.post(f"{served.url}/predictions", json={"input": {**SMALL, "image": "/etc/passwd"}}, timeout=60)
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "input", "image"], refused.text
    assert files.seen == []
    assert predict(served)["status"] == "succeeded"
    img2img = predict(served, input={**SMALL, "image": data_uri(png()), "prompt_strength": 0.5})
    assert img2img["output"][0].startswith("data:image/png;base64,")


def test_an_allowed_image_url_is_fetched_by_the_guard_and_used(model_dir, tmp_path):
    environ = dict(os.environ, COG_WEIGHTS=str(model_dir), FASTER_DIFFUSION_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    environ.update({ALLOW_HOSTS: "127.0.0.1"})
    with FileServer({"/img.png": png()}) as files, entry_point(ROOT, tmp_path / "serve.log", environ, STARTUP_TIMEOUT) as server:
        from_url = predict(server, input={**SMALL, "image": files.url("/img.png"), "prompt_strength": 0.5})
        from_data = predict(server, input={**SMALL, "image": data_uri(png()), "prompt_strength": 0.5})
    assert files.seen == ["/img.png"]
    assert from_url["output"] == from_data["output"]  # the same picture, whichever way it came
