"""Published PLONK checkpoints → geoloc checkpoints (``geoloc convert plonk SRC OUT``).

The reference publishes its networks on the Hugging Face hub as a ``model.safetensors`` holding the
``GeoAdaLNMLP`` parameters under their own names (no prefix) and a ``config.json`` with ``{cond_dim, depth,
dim, expansion, input_dim}`` (docs/reference-behaviour.md §12, §12.1); its training runs leave Lightning
``.ckpt`` files whose ``state_dict`` carries the same names behind an ``ema_network.`` prefix
(docs/reference-behaviour.md §14). Our :class:`~geoloc.network.GeoAdaLNMLP` uses exactly those names, so
conversion is a validated copy plus the metadata the reference keeps outside the weights: the family (from the
hub name: ``PLONK_YFCC`` is Riemannian flow matching, ``…_flow`` flow matching in R³, ``…_diffusion`` DDPM),
the schedule (sigmoid −7/3/1, every published run) and the backbone whose features the network was trained on
(OSV-5M: StreetCLIP; YFCC and iNat21: DINOv2-L with registers).

No weight changes are needed. Time: the reference network is called with the signal level γ (its time
embedding sees 1000·γ) and geoloc's network with the signal level s, the same number (``schedules.py``).
Output: the reference's RFM and FM networks return dx/dγ pointing toward the data, which is geoloc's dx/ds;
its DDPM network returns ε, as geoloc's diffusion family expects. ``tests/test_convert.py`` checks all of
this against an independent re-implementation of the reference forward pass and sampler.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from geoloc.checkpoint import save_checkpoint
from geoloc.config import FamilyConfig, config_to_dict
from geoloc.errors import CheckpointError, ConfigError
from geoloc.files import sha256_file
from geoloc.network import GeoAdaLNMLP, NetworkConfig, count_parameters

__all__ = [
    "DATASET_BACKBONES",
    "PLONK_FAMILIES",
    "ConvertResult",
    "convert_plonk",
    "infer_from_name",
    "plonk_network_config",
    "read_plonk",
]

PLONK_FAMILIES = ("rfm-s2", "flow-r3", "diffusion-r3")
"""The published generative families (the vMF baselines were never published)."""

DATASET_BACKBONES = {"osv5m": "streetclip", "yfcc": "dinov2-l-reg", "inat21": "dinov2-l-reg"}
"""Backbone whose 1024-d features each published model learnt from (docs/reference-behaviour.md §1, §12)."""

PLONK_SCHEDULE = {"start": -7.0, "end": 3.0, "tau": 1.0}
"""The sigmoid schedule of every published run and of ``PlonkPipeline`` (docs/reference-behaviour.md §5.1)."""

_CONFIG_KEYS = ("cond_dim", "depth", "dim", "expansion", "input_dim")
_EMA_PREFIX = "ema_network."
_RAW_PREFIX = "network."


@dataclass
class ConvertResult:
    """What :func:`convert_plonk` wrote: the output directory, the metadata chosen, and the tensor count."""

    out: Path
    family: str
    backbone: str
    dataset: str | None
    network: dict[str, int]
    tensors: int
    parameters: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        net = self.network
        lines = [
            f"wrote {self.out} ({self.family}, backbone {self.backbone}"
            + (f", dataset {self.dataset})" if self.dataset else ")"),
            f"network: dim {net['dim']}, depth {net['depth']}, expansion {net['expansion']}, "
            f"cond_dim {net['cond_dim']}; {self.tensors} tensors, {self.parameters:,} parameters",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- names
def infer_from_name(path: str | Path) -> tuple[str | None, str | None]:
    """``(dataset, family)`` guessed from a checkpoint path, ``None`` where the path does not say.

    Hub names (also inside a Hugging Face cache path ``models--nicolas-dufour--PLONK_YFCC_flow/snapshots/…``):
    ``PLONK_{YFCC,OSV_5M,iNaturalist}`` → ``rfm-s2``; a ``_flow`` suffix → ``flow-r3``; ``_diffusion`` →
    ``diffusion-r3``. Training-run directories (``osv_5m_…_flow_riemann_-7_3``) say ``riemann`` for RFM.
    Datasets: ``osv`` → ``osv5m``, ``yfcc`` → ``yfcc``, ``inat`` → ``inat21``. The reference's YFCC runs are
    also named ``iNaturalist_…`` (docs/reference-behaviour.md §16.17); both use the same backbone, so the
    guess is safe for that purpose.
    """
    for part in reversed(Path(path).parts):
        low = part.lower()
        if low.endswith((".ckpt", ".safetensors")):
            low = low.rsplit(".", 1)[0]
        dataset = None
        if "osv" in low:
            dataset = "osv5m"
        elif "yfcc" in low:
            dataset = "yfcc"
        elif "inat" in low:
            dataset = "inat21"
        if dataset is None and "plonk" not in low:
            continue
        if "diffusion" in low or "ddpm" in low:
            family = "diffusion-r3"
        elif "riemann" in low:
            family = "rfm-s2"
        elif re.search(r"(^|[_\-])flow($|[_\-])", low):
            family = "flow-r3"
        else:
            family = "rfm-s2" if "plonk" in low else None
        return dataset, family
    return None, None


# ------------------------------------------------------------------------------------------- reading
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise CheckpointError(f"{path}: cannot read weights ({e}); re-download the checkpoint") from e


def _read_lightning(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read it as a weights-only torch checkpoint ({type(e).__name__}); geoloc never "
            "unpickles code: export its state_dict with "
            "torch.save(ckpt['state_dict']) where you trust the file"
        ) from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no state_dict inside; is this a PLONK Lightning checkpoint?")
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and torch.is_tensor(v)}
    if not picked:
        heads = sorted({k.split(".", 1)[0] for k in state})[:8]
        raise CheckpointError(
            f"{path}: no '{prefix}*' weights (top-level names: {', '.join(heads)}); "
            "pass --weights raw for the non-EMA network"
        )
    return picked


def plonk_network_config(state: dict[str, torch.Tensor], where: str = "checkpoint") -> dict[str, int]:
    """``{cond_dim, depth, dim, expansion, input_dim}`` read off the tensor shapes.

    The shapes are those of docs/reference-behaviour.md §12.1.
    """
    try:
        dim, cond_dim = state["cond_mapper.weight"].shape
        input_dim = state["initial_mapper.weight"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        expansion = state["blocks.0.mlp.0.weight"].shape[0] // dim
    except (KeyError, ValueError, IndexError) as e:
        vmf = any(k.startswith(("mu_head", "kappa_head", "register")) for k in state)
        what = "a vMF baseline (not a published PLONK model)" if vmf else "not a PLONK GeoAdaLNMLP"
        raise CheckpointError(f"{where}: {what}; missing tensor {e}") from e
    return {
        "cond_dim": int(cond_dim),
        "depth": int(depth),
        "dim": int(dim),
        "expansion": int(expansion),
        "input_dim": int(input_dim),
    }


def read_plonk(src: str | Path, weights: str = "ema") -> tuple[dict[str, torch.Tensor], dict[str, int], dict]:
    """Read a PLONK checkpoint: ``(state_dict under the reference names, network config, provenance)``.

    ``src``: a hub folder (``model.safetensors`` + ``config.json``), its ``model.safetensors`` file, or a
    Lightning ``.ckpt`` (``weights="ema"`` takes ``ema_network.*``, the published weights; ``"raw"`` takes
    ``network.*``). A hub ``config.json`` must agree with the tensor shapes.
    """
    src = Path(src)
    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be 'ema' or 'raw', got {weights!r}")
    hub_config: dict | None = None
    if src.is_dir():
        wfile = src / "model.safetensors"
        if not wfile.is_file():
            ckpts = sorted(src.glob("*.ckpt"))
            if len(ckpts) == 1:
                return read_plonk(ckpts[0], weights)
            raise CheckpointError(
                f"{src}: no model.safetensors (the hub layout) and not exactly one .ckpt; "
                "download the repository with huggingface-cli or pass the file itself"
            )
        src_file = wfile
    elif src.is_file():
        src_file = src
    else:
        raise CheckpointError(f"{src}: no such file or directory")

    if src_file.suffix == ".ckpt":
        state = _read_lightning(src_file, _EMA_PREFIX if weights == "ema" else _RAW_PREFIX)
        layout = "lightning-ckpt"
    else:
        state = _read_safetensors(src_file)
        layout = "plonk-hub"
        cfg_path = src_file.parent / "config.json"
        if cfg_path.is_file():
            try:
                hub_config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    net = plonk_network_config(state, str(src_file))
    if hub_config is not None:
        for key in _CONFIG_KEYS:
            if key in hub_config and int(hub_config[key]) != net[key]:
                raise CheckpointError(
                    f"{src_file.parent}/config.json says {key}={hub_config[key]} but the weights "
                    f"have {key}={net[key]}; the download is inconsistent"
                )
    if net["input_dim"] != 3:
        raise CheckpointError(
            f"{src_file}: input_dim {net['input_dim']}; only the R³/S² models (input_dim 3) "
            "are supported, not the R² (lat, lon) variants"
        )
    provenance = {
        "layout": layout,
        "source": str(src_file.resolve()),
        "sha256": sha256_file(src_file),
        "weights": weights if layout == "lightning-ckpt" else "ema (as published)",
        "config": hub_config,
    }
    return state, net, provenance


# ------------------------------------------------------------------------------------------- converting
def _to_ours(state: dict[str, torch.Tensor], net_cfg: dict[str, int], where: str) -> tuple[dict, int]:
    """Load the reference tensors into our network (strict names and shapes); returns its state dict."""
    net = GeoAdaLNMLP(
        NetworkConfig(
            net_cfg["dim"], net_cfg["depth"], net_cfg["expansion"], net_cfg["cond_dim"], net_cfg["input_dim"]
        )
    )
    ours = net.state_dict()
    freqs_key = "time_embedder.encode_time.freqs"
    state = {k: v.to(torch.float32) for k, v in state.items()}
    if freqs_key in state:
        # A buffer, not learned; if it differs the time embedding is not the reference's and nothing would
        # match.
        if state[freqs_key].shape != ours[freqs_key].shape or not torch.allclose(
            state[freqs_key], ours[freqs_key], rtol=1e-5, atol=1e-7
        ):
            raise CheckpointError(
                f"{where}: {freqs_key} differs from 10000^(-2i/C); not the reference time embedding"
            )
    else:
        state[freqs_key] = ours[freqs_key]
    missing = sorted(set(ours) - set(state))
    extra = sorted(set(state) - set(ours))
    if missing or extra:
        raise CheckpointError(
            f"{where}: tensor names differ from the reference GeoAdaLNMLP (missing "
            f"{missing[:4]}, unexpected {extra[:4]}); is this a PLONK generative model?"
        )
    bad = [k for k in ours if tuple(ours[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{where}: {k} has shape {tuple(state[k].shape)}, expected {tuple(ours[k].shape)}"
        )
    net.load_state_dict(state, strict=True)
    return net.state_dict(), count_parameters(net)


def convert_plonk(
    src: str | Path,
    out: str | Path,
    *,
    family: str | None = None,
    backbone: str | None = None,
    weights: str = "ema",
    force: bool = False,
    command: str | None = None,
) -> ConvertResult:
    """Convert a PLONK checkpoint at ``src`` into a geoloc checkpoint directory ``out``.

    Args:
        src: hub folder, its ``model.safetensors``, or a Lightning ``.ckpt`` (see :func:`read_plonk`).
        out: output directory (``model.safetensors`` + ``config.json``); must not hold a checkpoint unless
            ``force``.
        family: ``rfm-s2`` | ``flow-r3`` | ``diffusion-r3``; default from the name (:func:`infer_from_name`),
            else ``rfm-s2``.
        backbone: ``streetclip`` | ``dinov2-l-reg`` (or any registry name); default from the dataset in the
            name (OSV-5M → streetclip, YFCC / iNat21 → dinov2-l-reg). Required when the name does not say.
        weights: ``ema`` (published) or ``raw`` (Lightning ``.ckpt`` only).
        command: the command line, recorded in ``config.json``.

    Raises:
        CheckpointError: unreadable or non-PLONK weights, inconsistent config, existing output.
        ConfigError: unknown family, or no backbone given and none inferable.
    """
    out = Path(out)
    if (out / "config.json").exists() and not force:
        raise CheckpointError(f"{out}: already holds a checkpoint; pass --force to overwrite it")
    dataset, guessed = infer_from_name(Path(src).resolve())
    notes: list[str] = []
    if family is None:
        family = guessed or "rfm-s2"
        if guessed is None:
            notes.append(
                "family not in the name; assumed rfm-s2 (pass --family flow-r3|diffusion-r3 otherwise)"
            )
    if family not in PLONK_FAMILIES:
        raise ConfigError(f"unknown PLONK family {family!r}; choose one of {', '.join(PLONK_FAMILIES)}")
    if backbone is None:
        if dataset is None:
            raise ConfigError(
                f"{src}: the path does not say which dataset the model was trained on; "
                "pass --backbone streetclip (OSV-5M) or --backbone dinov2-l-reg (YFCC, iNat21)"
            )
        backbone = DATASET_BACKBONES[dataset]

    state, net_cfg, provenance = read_plonk(src, weights)
    weights_out, n_params = _to_ours(state, net_cfg, str(src))
    if net_cfg["cond_dim"] != 1024 and backbone in ("streetclip", "dinov2-l-reg"):
        raise CheckpointError(
            f"{src}: cond_dim {net_cfg['cond_dim']} but {backbone} gives 1024-d features; "
            "pass the backbone the model was trained with (--backbone)"
        )
    if family == "rfm-s2":
        notes.append(
            "the reference samples RFM with an ambient Euler step + projection: "
            "SampleConfig(retraction='project') reproduces it"
        )
    fam_cfg = FamilyConfig(
        name=family, schedule="sigmoid", schedule_params=dict(PLONK_SCHEDULE), cond_drop=0.1
    )
    config: dict[str, Any] = {
        "family": config_to_dict(fam_cfg),
        "model": {"dim": net_cfg["dim"], "depth": net_cfg["depth"], "expansion": net_cfg["expansion"]},
        "cond_dim": net_cfg["cond_dim"],
        "backbone": {"name": backbone, "revision": "", "dim": net_cfg["cond_dim"], "preprocessing": {}},
        "converted_from": {
            **provenance,
            "reference": "nicolas-dufour/plonk (PlonkPipeline / GeoAdaLNMLP)",
            "dataset": dataset,
            "time_convention": "network input = signal level (reference gamma), unchanged; "
            "output = dx/dgamma (rfm, flow) or epsilon (diffusion), unchanged",
        },
    }
    if command:
        config["command"] = command
    save_checkpoint(out, weights_out, config)
    return ConvertResult(
        out=out,
        family=family,
        backbone=backbone,
        dataset=dataset,
        network=net_cfg,
        tensors=len(weights_out),
        parameters=n_params,
        notes=notes,
    )
