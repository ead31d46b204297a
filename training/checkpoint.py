"""cpc-train checkpoints: the one file that carries a trained model to every other tool.

    save_checkpoint(path, state)            # atomically: a kill at any moment leaves the last good file
    ckpt = load_checkpoint(path)            # dict: model, config, step (+ optimizer, scheduler)
    model, cfg = model_from_checkpoint(ckpt)
    model, cfg, step = load_model(path)     # what cpc-export, cpc-features and cpc-eval take: this, or a
                                            # CPC_audio checkpoint (cpc_audio.py)

A checkpoint is torch.save's zip of a dict with at least `model` (the state dict), `config` (the Config
as a nested dict) and `step` (int, optimiser steps taken); cpc-train adds `optimizer`, `scheduler` and
`model_hash`. Every way a file can be bad (missing, a folder, not a zip, a damaged byte, another
program's file, weights that do not fit the config) is a one-line UserError naming the file.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from cpc_stream.errors import UserError
from cpc_stream.files import atomic_write

from . import config as config_mod
from .config import Config
from .cpc_audio import CPCAudioConfig, is_cpc_audio, load_cpc_audio
from .model import CPC

CHECKPOINT = "checkpoint.pt"  # its name in train.out_dir


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` to `path` through a temporary file beside it, fsync, rename (atomic on POSIX)."""
    with atomic_write(path) as f:
        torch.save(state, f)


def damaged_member(path: Path) -> str | None:
    """The first member of zip `path` whose bytes do not match their CRC-32, or None. torch.load does not
    check the CRCs, so a flipped byte in the weights would otherwise load as different numbers."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"the zip itself ({e})"


def read_file(
    path: str | Path, map_location: str | torch.device = "cpu", weights_only: bool = False
) -> object:
    """torch.load of a checkpoint file that exists and is intact; anything else is a one-line UserError.
    weights_only: read tensors and plain data only (pickle.UnpicklingError for anything else)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"checkpoint {p} is a folder; give the checkpoint.pt file")
    if not p.is_file():
        raise UserError(f"checkpoint {p} not found")
    if zipfile.is_zipfile(p):  # torch.save's format since torch 1.6
        bad = damaged_member(p)
        if bad is not None:
            raise UserError(f"checkpoint {p} is damaged: CRC mismatch in {bad}; use an intact copy")
    try:
        return torch.load(p, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError:
        if weights_only:
            raise
        raise UserError(f"checkpoint {p} is unreadable (not a torch.save file)") from None
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(
            f"checkpoint {p} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a cpc-train checkpoint; a missing, damaged or foreign file is a one-line UserError."""
    return _cpc_train_checkpoint(read_file(path, map_location), Path(path))


def _cpc_train_checkpoint(ckpt: object, p: Path, cpc_audio_too: bool = False) -> dict:
    """ckpt, checked to be a cpc-train checkpoint. cpc_audio_too: the caller takes CPC_audio's as well."""
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        if is_cpc_audio(ckpt) and not cpc_audio_too:
            raise UserError(f"checkpoint {p} is CPC_audio's; this command needs a cpc-train checkpoint")
        also = " nor a CPC_audio one (config/weights, or gEncoder/cpcCriterion)" if cpc_audio_too else ""
        raise UserError(f"checkpoint {p} is not a cpc-train checkpoint (no model/config/step){also}")
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"checkpoint {p}: step is {step!r}, expected an integer >= 0")
    if not isinstance(ckpt["config"], dict):
        raise UserError(f"checkpoint {p}: config is a {type(ckpt['config']).__name__}, expected a mapping")
    return ckpt


def load_model(path: str | Path) -> tuple[nn.Module, Config | CPCAudioConfig, int]:
    """The model of any checkpoint that cpc-export, cpc-features and cpc-eval take, in eval mode on the
    CPU, with its configuration (whose model_hash() an exported graph records) and training step:
    - a cpc-train checkpoint: (CPC, Config, step);
    - a CPC_audio checkpoint, released or training (cpc_audio.py): (CPCAudio, CPCAudioConfig, 0).
    The file's own keys say which it is. It is read with weights_only first (tensors and plain data, no
    code runs: how torch.hub reads a downloaded checkpoint); only a cpc-train checkpoint may need more.
    A missing, damaged, foreign or unsupported file is a one-line UserError."""
    try:
        saved = read_file(path, weights_only=True)
    except pickle.UnpicklingError:  # more than tensors and plain data: only a cpc-train checkpoint may be
        saved = _cpc_train_checkpoint(read_file(path), Path(path), cpc_audio_too=True)
    if is_cpc_audio(saved):
        model = load_cpc_audio(saved, path)
        return model, model.cfg, 0
    ckpt = _cpc_train_checkpoint(saved, Path(path), cpc_audio_too=True)
    model, cfg = model_from_checkpoint(ckpt)
    return model, cfg, ckpt["step"]


def model_from_checkpoint(ckpt: dict) -> tuple[CPC, Config]:
    """Rebuild the model a checkpoint was trained with, in eval mode on the CPU."""
    cfg = config_mod.from_dict(ckpt["config"])
    model = CPC(cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"checkpoint weights do not fit its own config: {str(e).splitlines()[0]}") from None
    return model.eval(), cfg
