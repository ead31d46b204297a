"""Reading audio files into the model's format: mono float32 at the model's sample rate (soundfile + soxr)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import UserError


def to_mono(x: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) float32, channels averaged."""
    x = np.asarray(x, dtype=np.float32)
    return x if x.ndim == 1 else x.mean(axis=1, dtype=np.float32)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Any file soundfile reads, any rate, channels and sample width -> (samples,) float32 mono at
    `sample_rate`, full scale [-1, 1]. Resampled with soxr (high quality) when the rates differ."""
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        reason = "no such file" if not Path(path).exists() else str(e).split("\n")[0]
        raise UserError(f"cannot read audio file {path}: {reason}") from None
    x = to_mono(x)
    if sr != sample_rate:
        x = soxr.resample(x, sr, sample_rate, quality="HQ").astype(np.float32)
    return x
