"""Audio in the model's format: mono float32 at the model's sample rate (soundfile + soxr).

One policy for every entry point (the daemon's sources, cpc-features, the export proof): samples that
are not finite (NaN, +-Inf) are replaced with 0 and counted, because one NaN sample would otherwise
turn every later frame of a causal model into NaN. Callers report the count (a warning, and the
daemon's `stats`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import UserError

log = logging.getLogger("cpc.audio")


def to_mono(x: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) float32, channels averaged."""
    x = np.asarray(x, dtype=np.float32)
    return x if x.ndim == 1 else x.mean(axis=1, dtype=np.float32)


def replace_nonfinite(x: np.ndarray) -> int:
    """Set NaN and +-Inf samples of float array `x` to 0, in place. Returns how many there were."""
    bad = ~np.isfinite(x)
    n = int(np.count_nonzero(bad))
    if n:
        x[bad] = 0.0
    return n


def unreadable_reason(path: str | Path) -> str | None:
    """Why `path` cannot be opened as a file, in words (None if it can be opened for reading)."""
    p = Path(path)
    if not p.exists():
        return "no such file"
    if p.is_dir():
        return "is a folder, not an audio file"
    if not os.access(p, os.R_OK):
        return "permission denied"
    return None


def open_audio(path: str | Path) -> sf.SoundFile:
    """Open any file soundfile reads; a missing, unreadable or undecodable file is a one-line UserError."""
    reason = unreadable_reason(path)
    if reason is None:
        try:
            return sf.SoundFile(os.fsencode(path))  # bytes: any name the file system gives, UTF-8 or not
        except (sf.LibsndfileError, RuntimeError, OSError) as e:
            reason = f"not a readable audio file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    raise UserError(f"cannot read audio file {path}: {reason}")


class Resampler:
    """Streaming mono mix, non-finite replacement and resampling to `rate_out` (soxr.ResampleStream; a
    no-op at the same rate). `nonfinite` counts the input samples (per channel) that were replaced."""

    def __init__(self, rate_in: int, rate_out: int):
        self.stream = (
            None
            if rate_in == rate_out
            else soxr.ResampleStream(rate_in, rate_out, 1, dtype="float32", quality="HQ")
        )
        self.nonfinite = 0

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        """block (frames,) or (frames, channels) at rate_in -> (samples,) float32 at rate_out."""
        x = np.array(block, dtype=np.float32)  # a copy: the caller's buffer is left as it was
        self.nonfinite += replace_nonfinite(x)
        x = to_mono(x)
        if self.stream is None:
            return x
        return self.stream.resample_chunk(x, last=last)


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Any file soundfile reads, any rate, channels and sample width -> (samples,) float32 mono at
    `sample_rate`, full scale [-1, 1]. Resampled with soxr (high quality) when the rates differ.
    Non-finite samples become 0, with a warning that counts them."""
    with open_audio(path) as f:
        try:
            x = f.read(dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise UserError(f"cannot read audio file {path}: {str(e).splitlines()[0]}") from None
        sr = f.samplerate
    bad = replace_nonfinite(x)
    if bad:
        log.warning("%s: %d non-finite samples (NaN or Inf) replaced with 0", path, bad)
    x = to_mono(x)
    if sr != sample_rate:
        x = soxr.resample(x, sr, sample_rate, quality="HQ").astype(np.float32)
    return x
