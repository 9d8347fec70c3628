"""Where the service's Stable Diffusion weights come from, and loading them.

Resolution order (``resolve_weights``):

1. an explicit source: the ``weights`` argument of ``Predictor.setup`` or the
   ``COG_WEIGHTS`` environment variable, either a local diffusers pipeline
   directory or a URL (``http(s)://`` or ``file://``) of a tar (optionally
   gzip/bzip2/xz-compressed) holding one; a URL is downloaded and unpacked once
   into ``<cache_dir()>/weights/`` (``service.cache``);
2. ``weights/stable-diffusion-v1-5`` (filled by ``script/download-weights``);
3. the bundled ``weights/tiny-shapes`` toy model, with a warning naming the
   missing weights and the command that fetches them.

An explicit source that cannot be used is an error, never a silent fallback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
SD15_DIR = REPO_ROOT / "weights" / "stable-diffusion-v1-5"
TINY_SHAPES_DIR = REPO_ROOT / "weights" / "tiny-shapes"
SD15_REPO_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DOWNLOAD_COMMAND = "script/download-weights"
URL_SCHEMES = ("http", "https", "file")


# The pipelines the service serves (text-to-image, with img2img and inpainting derived from it).
# The library also accelerates video (TextToVideoSD, AnimateDiff) and DeepFloyd IF pipelines;
# the service does not take them, and says so at setup instead of failing in a prediction.
SERVED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionXLControlNetPipeline",
)


class WeightsError(RuntimeError):
    """The weights could not be found, fetched or read; the message says which and where."""


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path  # a diffusers pipeline directory (holds model_index.json)
    source: str  # what was asked for: the URL, the directory, or the default's name
    warning: str | None = None  # set when falling back to the bundled toy model


def is_pipeline_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "model_index.json").is_file()


def resolve_weights(
    weights: str | os.PathLike | None = None,
    *,
    default_dir: Path = SD15_DIR,
    fallback_dir: Path = TINY_SHAPES_DIR,
) -> ResolvedWeights:
    """Finds the pipeline directory to load (see the module docstring for the order)."""
    explicit = weights if weights not in (None, "") else os.environ.get("COG_WEIGHTS") or None
    if explicit is not None:
        source = str(explicit)
        if urllib.parse.urlparse(source).scheme in URL_SCHEMES:
            return ResolvedWeights(fetch_tar(source), source)
        path = Path(source).expanduser()
        if not path.exists():
            raise WeightsError(f"weights {source!r} (COG_WEIGHTS / setup weights) does not exist")
        if not path.is_dir():
            raise WeightsError(
                f"weights {source!r} is a file; give a diffusers pipeline directory or a URL of a tar of one"
            )
        return ResolvedWeights(find_pipeline_dir(path, source), source)

    if is_pipeline_dir(default_dir):
        return ResolvedWeights(Path(default_dir), str(default_dir))
    if is_pipeline_dir(fallback_dir):
        message = (
            f"Stable Diffusion v1.5 weights not found at {default_dir}: falling back to the bundled toy model "
            f"{fallback_dir} (64x64 coloured shapes only). Run `{DOWNLOAD_COMMAND}` to fetch {SD15_REPO_ID}, "
            f"or set COG_WEIGHTS to a diffusers pipeline directory or a URL of a tar of one."
        )
        return ResolvedWeights(Path(fallback_dir), str(fallback_dir), warning=message)
    raise WeightsError(
        f"no weights: {default_dir} and the bundled {fallback_dir} are both missing. Run `{DOWNLOAD_COMMAND}` "
        f"or set COG_WEIGHTS to a diffusers pipeline directory or a URL of a tar of one."
    )


def find_pipeline_dir(root: Path, source: str) -> Path:
    """``root`` itself, or its only subdirectory, when it holds model_index.json."""
    if is_pipeline_dir(root):
        return root
    candidates = [p for p in sorted(root.iterdir()) if p.is_dir() and is_pipeline_dir(p)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WeightsError(f"weights {source!r}: no model_index.json in {root} (not a diffusers pipeline directory)")
    names = ", ".join(p.name for p in candidates)
    raise WeightsError(f"weights {source!r}: several pipelines in {root} ({names}); point at one of them")


def download(url: str, dest) -> None:
    """Writes what ``url`` (http, https or file) holds to ``dest``; raises OSError or ValueError.
    For the operator's own URL (``COG_WEIGHTS``) only: what a client names goes through ``service.fetch``."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)


def fetch_tar(url: str, dest_root: Path | None = None) -> Path:
    """Downloads and unpacks the tar at ``url`` once; returns the pipeline directory in it."""
    dest_root = Path(dest_root) if dest_root is not None else cache_dir() / "weights"
    dest = dest_root / hashlib.sha256(url.encode()).hexdigest()[:16]
    done = dest / ".complete"
    if not done.exists():
        dest_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_root))
        try:
            archive = staging / "weights.tar"
            try:
                download(url, archive)
            except (OSError, ValueError) as err:  # URLError and HTTPError are OSErrors
                raise WeightsError(f"weights {url!r}: download failed: {err}") from err
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(staging / "tree", filter="data")
            except (tarfile.TarError, OSError) as err:
                raise WeightsError(f"weights {url!r}: not a readable tar archive: {err}") from err
            archive.unlink()
            shutil.rmtree(dest, ignore_errors=True)
            (staging / "tree").rename(dest)
            done.touch()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return find_pipeline_dir(dest, url)


def detect_variant(path: Path) -> str | None:
    """"fp16" when the UNet is stored only as an fp16 variant (what script/download-weights fetches)."""
    unet = Path(path) / "unet"
    plain = list(unet.glob("diffusion_pytorch_model.safetensors")) + list(unet.glob("diffusion_pytorch_model.bin"))
    fp16 = list(unet.glob("diffusion_pytorch_model.fp16.*"))
    return "fp16" if fp16 and not plain else None


def read_model_index(path: Path) -> dict:
    index = Path(path) / "model_index.json"
    try:
        data = json.loads(index.read_text())
    except FileNotFoundError as err:
        raise WeightsError(f"weights at {path}: model_index.json is missing") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"weights at {path}: model_index.json is not valid JSON ({err})") from err
    if not isinstance(data, dict) or "_class_name" not in data:
        raise WeightsError(f"weights at {path}: model_index.json has no _class_name; not a diffusers pipeline")
    return data


def load_pipeline(path: str | os.PathLike, device: str = "cpu", dtype=None):
    """The pipeline saved at ``path`` on ``device`` (fp16 on CUDA, fp32 elsewhere by default).

    The class comes from model_index.json, as with ``DiffusionPipeline.from_pretrained``:
    SD1.x/2.x, SDXL, or a ControlNet pipeline whose folder holds a ``controlnet``.
    The weights' safety checker and feature extractor are loaded when model_index.json names them
    (``service.safety`` then drops flagged images).
    """
    import torch
    from diffusers import DiffusionPipeline

    path = Path(path)
    index = read_model_index(path)  # a readable error for the commonest corruption
    if index["_class_name"] not in SERVED_PIPELINES:
        raise WeightsError(
            f"weights at {path}: a {index['_class_name']} is not served; the service takes "
            f"{', '.join(SERVED_PIPELINES)} (faster_diffusion.enable also accelerates video and IF pipelines in Python)"
        )
    # The weights' safety checker is loaded when they ship one (SD1.5's model_index.json names it);
    # otherwise the pipeline is told there is none, so diffusers does not warn.
    ships_checker = _names_component(index, "safety_checker") and _names_component(index, "feature_extractor")
    no_safety_checker = (
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if "safety_checker" in index and not ships_checker
        else {}
    )
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    variant = detect_variant(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(
                path, torch_dtype=dtype, variant=variant, use_safetensors=None, **no_safety_checker
            )
    except Exception as err:
        raise WeightsError(f"weights at {path}: could not load a {index['_class_name']}: {type(err).__name__}: {err}") from err
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _names_component(index: dict, name: str) -> bool:
    """Whether model_index.json gives ``name`` a class (``[library, class]``, not ``[null, null]``)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
