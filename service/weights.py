"""Where the service's weights come from, loading them, and the call defaults they imply.

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

Stable Diffusion (1.x/2.x, SDXL, ControlNet) and flow-matching transformer weights (``FluxPipeline``,
``StableDiffusion3Pipeline``) are served; model_index.json says which. ``call_defaults`` reads what a
prediction uses where the client leaves an input unset from the transformer weights themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tarfile
import tempfile
import urllib.parse
import urllib.request
import inspect
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


# The pipelines the service serves: Stable Diffusion's (text-to-image, with img2img and inpainting derived
# from it) and the flow-matching transformers' (text-to-image only).
# The library also accelerates video (TextToVideoSD, AnimateDiff), DeepFloyd IF, DiT and PixArt pipelines;
# the service does not take them, and says so at setup instead of failing in a prediction.
TRANSFORMER_PIPELINES = ("FluxPipeline", "StableDiffusion3Pipeline")
SERVED_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionXLControlNetPipeline",
    *TRANSFORMER_PIPELINES,
)
#: true classifier-free guidance of Flux weights without a guidance embedding, where the client sets no
#: guidance_scale (FluxPipeline's own true_cfg_scale default, 1, samples unguided): Qwen-Image's default, and
#: weights/tiny-shapes-flux's default call
TRUE_CFG_DEFAULT = 4.0


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
    """"fp16" when the UNet (or a transformer pipeline's transformer) is stored only as an fp16 variant (what
    script/download-weights fetches)."""
    unet = Path(path) / "unet"
    if not unet.is_dir() and (Path(path) / "transformer").is_dir():
        unet = Path(path) / "transformer"
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
    if index["_class_name"] in TRANSFORMER_PIPELINES:
        # components the weights leave out ([null, null], e.g. SD3 without its T5 encoder) are passed as None,
        # as diffusers needs for a pipeline saved without them
        no_safety_checker = {name: None for name, entry in index.items()
                             if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is None}
    variant = detect_variant(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(
                path, torch_dtype=dtype, variant=variant, use_safetensors=None, **no_safety_checker
            )
    except Exception as err:
        raise WeightsError(f"weights at {path}: could not load a {index['_class_name']}: {type(err).__name__}: {err}") from err
    if index["_class_name"] in TRANSFORMER_PIPELINES and pipe.vae.config.get("shift_factor") is None:
        raise WeightsError(f"weights at {path}: vae/config.json has no shift_factor, which a {index['_class_name']} "
                           "adds to its latents before decoding (Flux's VAE: 0.1159, SD3's: 0.0609; 0.0 for none)")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class CallDefaults:
    """How the pipeline is called where a prediction leaves an input unset, and the sizes it takes.

    ``guidance`` is the pipeline argument the ``guidance_scale`` input becomes: ``"guidance_scale"`` (classifier-free
    guidance: Stable Diffusion, SD3; with ``distilled``, Flux's guidance embedding: FLUX.1-dev's distilled guidance,
    one transformer call a step, no negative prompt) or ``"true_cfg_scale"`` (Flux without a guidance embedding: true
    classifier-free guidance, a second transformer call a step against the negative prompt)."""

    scheduler: str  # the `scheduler` input's default
    num_inference_steps: int
    guidance_scale: float
    guidance: str = "guidance_scale"  # the pipeline argument guidance_scale maps to
    distilled: bool = False
    max_sequence_length: int | None = None  # T5 tokens (transformer pipelines)
    native_size: int = 512  # pixels, the image size the weights were made for (width and height unset)
    size_multiple: int = 8  # width and height must be multiples of this


#: Stable Diffusion weights: the service's defaults (DDIM-50, guidance 7.5; calibrated at setup)
SD_SCHEDULER, SD_STEPS, SD_GUIDANCE = "DDIM", 50, 7.5


def call_defaults(pipe) -> CallDefaults:
    """The defaults of ``pipe``, from its weights where they say (see ``CallDefaults``).

    Stable Diffusion: DDIM-50 at guidance 7.5, the UNet's ``sample_size`` in pixels, multiples of 8 and of the VAE's
    downsampling. ``FluxPipeline`` and ``StableDiffusion3Pipeline``: the weights' own FlowMatchEuler scheduler at
    the pipeline's default steps (28). Guidance: Flux with ``guidance_embeds`` gets FluxPipeline's distilled
    ``guidance_scale`` default (3.5), Flux without it true CFG at ``TRUE_CFG_DEFAULT``, SD3 its own default (7).
    ``max_sequence_length``: the pipeline's default, capped at the T5 tokenizer's ``model_max_length`` (the length
    its text encoder was made for: weights trained on short captions say so in tokenizer_2/ (Flux) or tokenizer_3/
    (SD3) tokenizer_config.json). Native size: SD3's transformer ``sample_size`` in pixels; Flux's transformer has
    none, so its VAE's ``sample_size``. Size multiple: 8, and the VAE's downsampling times what the pipeline packs
    (Flux 2x2 latents, SD3 its ``patch_size``).
    """
    from diffusers import FluxPipeline

    if getattr(pipe, "transformer", None) is None:
        return CallDefaults(SD_SCHEDULER, SD_STEPS, SD_GUIDANCE, native_size=pipe.unet.config.sample_size * pipe.vae_scale_factor,
                            size_multiple=math.lcm(8, pipe.vae_scale_factor))
    from .schedulers import FLOW_SCHEDULERS

    parameters = inspect.signature(type(pipe).__call__).parameters
    config = pipe.transformer.config
    flux = isinstance(pipe, FluxPipeline)
    distilled = flux and bool(config.get("guidance_embeds", False))
    if flux and not distilled:
        guidance, scale = "true_cfg_scale", TRUE_CFG_DEFAULT
    else:
        guidance, scale = "guidance_scale", float(parameters["guidance_scale"].default)
    length = parameters["max_sequence_length"].default
    t5 = getattr(pipe, "tokenizer_2" if flux else "tokenizer_3", None)
    if t5 is not None and 0 < getattr(t5, "model_max_length", length) < length:
        length = int(t5.model_max_length)
    patch = 2 if flux else int(config.get("patch_size", 1))
    native = int(config.sample_size) * pipe.vae_scale_factor if config.get("sample_size") else int(pipe.vae.config.sample_size)
    return CallDefaults(
        scheduler=FLOW_SCHEDULERS[0], num_inference_steps=int(parameters["num_inference_steps"].default),
        guidance_scale=scale, guidance=guidance, distilled=distilled, max_sequence_length=int(length),
        native_size=native, size_multiple=math.lcm(8, pipe.vae_scale_factor * patch),
    )


def _names_component(index: dict, name: str) -> bool:
    """Whether model_index.json gives ``name`` a class (``[library, class]``, not ``[null, null]``)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
