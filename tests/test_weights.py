"""service.weights: where the service's weights come from, and loading them."""

from __future__ import annotations

import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from service import weights as W


def fake_pipeline(path: Path, marker: str = "") -> Path:
    """A directory that looks like a diffusers pipeline (enough for resolution, not for loading)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "marker": marker}))
    return path


def make_tar(src: Path, dest: Path, arcname: str = "model", mode: str = "w") -> Path:
    with tarfile.open(dest, mode) as tar:
        tar.add(src, arcname=arcname)
    return dest


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("COG_WEIGHTS", raising=False)
    monkeypatch.setenv("FASTER_DIFFUSION_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def http_root(tmp_path):
    """A static file server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# -- resolution order ------------------------------------------------------------------------------------------


def test_explicit_directory(tmp_path):
    model = fake_pipeline(tmp_path / "model")
    resolved = W.resolve_weights(str(model), default_dir=tmp_path / "none", fallback_dir=tmp_path / "none")
    assert resolved.path == model and resolved.warning is None


def test_cog_weights_env(monkeypatch, tmp_path):
    model = fake_pipeline(tmp_path / "model")
    monkeypatch.setenv("COG_WEIGHTS", str(model))
    assert W.resolve_weights(None, default_dir=tmp_path / "none").path == model


def test_explicit_argument_beats_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COG_WEIGHTS", str(fake_pipeline(tmp_path / "env")))
    model = fake_pipeline(tmp_path / "arg")
    assert W.resolve_weights(model).path == model


def test_directory_holding_one_pipeline(tmp_path):
    inner = fake_pipeline(tmp_path / "outer" / "stable-diffusion")
    assert W.resolve_weights(tmp_path / "outer").path == inner


def test_missing_explicit_directory_is_an_error_not_a_fallback(tmp_path):
    fallback = fake_pipeline(tmp_path / "tiny")
    with pytest.raises(W.WeightsError, match="does not exist") as err:
        W.resolve_weights(str(tmp_path / "nope"), default_dir=tmp_path / "none", fallback_dir=fallback)
    assert str(tmp_path / "nope") in str(err.value)


def test_explicit_directory_without_pipeline(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(W.WeightsError, match="no model_index.json"):
        W.resolve_weights(tmp_path / "empty")


def test_explicit_file_is_an_error(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(W.WeightsError, match="is a file"):
        W.resolve_weights(tmp_path / "weights.safetensors")


def test_default_directory_first(tmp_path):
    default = fake_pipeline(tmp_path / "sd15")
    fallback = fake_pipeline(tmp_path / "tiny")
    resolved = W.resolve_weights(None, default_dir=default, fallback_dir=fallback)
    assert resolved.path == default and resolved.warning is None


def test_fallback_to_bundled_model_warns_with_the_fix(tmp_path):
    fallback = fake_pipeline(tmp_path / "tiny")
    resolved = W.resolve_weights(None, default_dir=tmp_path / "sd15", fallback_dir=fallback)
    assert resolved.path == fallback
    assert str(tmp_path / "sd15") in resolved.warning
    assert "script/download-weights" in resolved.warning and "COG_WEIGHTS" in resolved.warning


def test_no_weights_at_all(tmp_path):
    with pytest.raises(W.WeightsError, match="script/download-weights"):
        W.resolve_weights(None, default_dir=tmp_path / "sd15", fallback_dir=tmp_path / "tiny")


def test_default_paths_are_the_documented_ones():
    assert W.SD15_DIR == W.REPO_ROOT / "weights" / "stable-diffusion-v1-5"
    assert W.TINY_SHAPES_DIR == W.REPO_ROOT / "weights" / "tiny-shapes"


# -- tar URLs --------------------------------------------------------------------------------------------------


def test_file_url_tar(tmp_path):
    archive = make_tar(fake_pipeline(tmp_path / "src", marker="file"), tmp_path / "model.tar")
    resolved = W.resolve_weights(archive.as_uri())
    assert json.loads((resolved.path / "model_index.json").read_text())["marker"] == "file"
    assert resolved.path.is_relative_to(tmp_path / "cache")
    assert resolved.source == archive.as_uri()


def test_http_url_tar_gz_is_downloaded_once(tmp_path, http_root):
    root, base = http_root
    make_tar(fake_pipeline(tmp_path / "src", marker="http"), root / "model.tar.gz", mode="w:gz")
    first = W.resolve_weights(f"{base}/model.tar.gz")
    assert json.loads((first.path / "model_index.json").read_text())["marker"] == "http"
    (root / "model.tar.gz").unlink()  # a second resolution must come from the cache
    assert W.resolve_weights(f"{base}/model.tar.gz").path == first.path


def test_tar_with_pipeline_at_its_root(tmp_path):
    src = fake_pipeline(tmp_path / "src", marker="root")
    archive = tmp_path / "flat.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src / "model_index.json", arcname="model_index.json")
    assert json.loads((W.fetch_tar(archive.as_uri()) / "model_index.json").read_text())["marker"] == "root"


def test_http_404_names_the_url(http_root):
    _, base = http_root
    with pytest.raises(W.WeightsError, match="download failed") as err:
        W.resolve_weights(f"{base}/missing.tar")
    assert f"{base}/missing.tar" in str(err.value)


def test_not_a_tar(tmp_path):
    (tmp_path / "model.tar").write_text("this is not a tar archive")
    with pytest.raises(W.WeightsError, match="not a readable tar"):
        W.resolve_weights((tmp_path / "model.tar").as_uri())
    assert not list((tmp_path / "cache").glob("**/model_index.json"))


def test_tar_escaping_its_directory_is_refused(tmp_path):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"owned"
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(W.WeightsError, match="not a readable tar"):
        W.fetch_tar(archive.as_uri())
    assert not list(tmp_path.rglob("escaped.txt"))


# -- reading and loading ---------------------------------------------------------------------------------------


def test_corrupt_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(W.WeightsError, match="model_index.json is not valid JSON") as err:
        W.read_model_index(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_model_index_without_class(tmp_path):
    (tmp_path / "model_index.json").write_text("[]")
    with pytest.raises(W.WeightsError, match="_class_name"):
        W.read_model_index(tmp_path)


def test_detect_variant(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    assert W.detect_variant(tmp_path) is None
    (unet / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert W.detect_variant(tmp_path) == "fp16"
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert W.detect_variant(tmp_path) is None


def test_load_pipeline(model_dir):
    import torch

    pipe = W.load_pipeline(model_dir, device="cpu")
    assert pipe.unet.dtype == torch.float32
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor in (4, 8)


def test_load_pipeline_with_missing_component_is_readable(tmp_path):
    fake_pipeline(tmp_path / "model")
    index = tmp_path / "model" / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(W.WeightsError, match="could not load a StableDiffusionPipeline") as err:
        W.load_pipeline(tmp_path / "model")
    assert str(tmp_path / "model") in str(err.value)


@pytest.mark.parametrize("name", ["TextToVideoSDPipeline", "AnimateDiffPipeline", "IFPipeline", "DiTPipeline"])
def test_unserved_pipelines_fail_setup_naming_the_served_ones(tmp_path, name):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": name}))
    with pytest.raises(W.WeightsError, match=f"a {name} is not served; the service takes StableDiffusionPipeline, ") as err:
        W.load_pipeline(tmp_path)
    assert "StableDiffusionXLControlNetPipeline" in str(err.value) and str(tmp_path) in str(err.value)
