"""cpc-train checkpoints: the one file that carries a trained model to every other tool.

    save_checkpoint(path, state)            # atomically: a kill at any moment leaves the last good file
    ckpt = load_checkpoint(path)            # dict: model, config, step (+ optimizer, scheduler)
    model, cfg = model_from_checkpoint(ckpt)

A checkpoint is torch.save's zip of a dict with at least `model` (the state dict), `config` (the Config
as a nested dict) and `step` (int, optimiser steps taken); cpc-train adds `optimizer`, `scheduler` and
`model_hash`. Every way a file can be bad (missing, a folder, not a zip, a damaged byte, another
program's file, weights that do not fit the config) is a one-line UserError naming the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from cpc_stream.errors import UserError
from cpc_stream.files import atomic_write

from . import config as config_mod
from .config import Config
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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a cpc-train checkpoint; a missing, damaged or foreign file is a one-line UserError."""
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
        ckpt = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        raise UserError(
            f"checkpoint {p} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        raise UserError(f"checkpoint {p} is not a cpc-train checkpoint (no model/config/step)")
    step = ckpt["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"checkpoint {p}: step is {step!r}, expected an integer >= 0")
    if not isinstance(ckpt["config"], dict):
        raise UserError(f"checkpoint {p}: config is a {type(ckpt['config']).__name__}, expected a mapping")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> tuple[CPC, Config]:
    """Rebuild the model a checkpoint was trained with, in eval mode on the CPU."""
    cfg = config_mod.from_dict(ckpt["config"])
    model = CPC(cfg.model)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"checkpoint weights do not fit its own config: {str(e).splitlines()[0]}") from None
    return model.eval(), cfg
