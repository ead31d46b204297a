"""cpc-features: offline z_t, c_t and k-step prediction scores for audio files, from a checkpoint.

    cpc-features --checkpoint runs/cpc/checkpoint.pt --out feats/ a.flac b.wav ...
    cpc-features --checkpoint 60k_epoch4-d0f474de.pt --out feats/ a.flac       # a CPC_audio model

Writes feats/<name>.npz with z (frames, enc_dim), c (frames, ctx_dim), scores and logprob (frames, K;
NaN where t - k < 0; only for a model with linear predictors) as float32, and hop / sample_rate; frames
= samples at 16 kHz // 160. The checkpoint is cpc-train's or CPC_audio's (training/checkpoint.py
load_model); a CPC_audio model's frames are CPC_audio's own offline output, its last frame included
(computed on its zero padding after the end, as CPC_audio computes it). Any format,
rate and channel count soundfile reads is accepted (mixed to mono, resampled with soxr). extract() is the
whole-utterance reference that the streaming graph and the daemon are checked against.

Files of any length: the audio is read and run through the model in pieces of --chunk-seconds, the
model's state carried from one to the next (each conv layer's left context, the GRU's hidden state, the
last frames of z and c that the scores look back on), so the frames equal extract() on the whole file
(to float rounding) while memory stays bounded by one piece; the outputs go to disk as they come
(cpc_stream.files.NpzWriter) and each .npz is written atomically. Non-finite samples (NaN, Inf) are
replaced with 0, with a warning that counts them; a file shorter than one hop (160 samples) gives a
warning and an .npz of 0 frames. A file that cannot be read is reported in one line and the others are
still written (exit 2).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from torch import nn

from cpc_stream.audio import Resampler, open_audio
from cpc_stream.errors import UserError, run_cli
from cpc_stream.files import NpzWriter

from .checkpoint import load_model
from .config import HOP, SAMPLE_RATE
from .model import MAX_WINDOW, prediction_scores

# Audio run through the model at once. What it bounds: peak RSS 0.57-0.66 GB with the paper-size model,
# for 1 minute or 2 hours alike (bench/features_memory.py); the conv1 activations of one piece dominate.
CHUNK_SECONDS = 10


@torch.no_grad()
def extract(model: nn.Module, wav: np.ndarray, window: int = 128) -> dict[str, np.ndarray]:
    """wav (samples,) float32 at 16 kHz -> dict of z, c and, with predictors, scores, logprob, each
    (frames, ...) float32."""
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None]
    z, c = model(x)
    out = {"z": z[0].numpy(), "c": c[0].numpy()}
    if model.predictor is not None:
        scores, logprob, _ = prediction_scores(model, z, c, window)
        out.update(scores=scores[0].numpy(), logprob=logprob[0].numpy())
    return out


class Extractor:
    """extract(), one piece of audio after another with the model's state carried between them: the
    pieces' outputs, concatenated with finish()'s, are extract() of the whole audio (to float rounding).
    A model with look-ahead (CPC_audio's) returns each frame once the piece holding its last sample has
    come, and its last frames from finish()."""

    def __init__(self, model: nn.Module, window: int = 128):
        self.model, self.window = model, window
        self.context = None  # the encoder's, None at the start
        self.state = None  # the context network's (a torch GRU's or LSTM's), None at the start
        # The scores of frame t read c_{t-K} .. c_{t-1} and z_{t-W} .. z_{t-1}: the last max(W, K) frames
        # of both go in front of the next piece (frames before the start are masked as in extract()).
        self.keep = max(window, model.cfg.n_steps)
        self.z_tail = torch.zeros(1, 0, model.cfg.enc_dim)
        self.c_tail = torch.zeros(1, 0, model.cfg.ctx_dim)

    def __call__(self, wav: np.ndarray) -> dict[str, np.ndarray]:
        """wav (samples,) float32 at 16 kHz, a whole number (>= 1) of 160-sample hops -> dict of z, c (and
        scores, logprob) of the frames it completes: its samples // 160 for a causal model."""
        return self._run(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None], last=False)

    def finish(self) -> dict[str, np.ndarray]:
        """The frames still waiting for audio after the end: a look-ahead model's last; none else."""
        return self._run(torch.zeros(1, 0), last=True)

    @torch.no_grad()
    def _run(self, x: torch.Tensor, last: bool) -> dict[str, np.ndarray]:
        if x.shape[1] or self.model.lookahead:
            z, self.context = self.model.encoder.chunk(x, self.context, last)
        else:  # the end of a causal model's audio: no frame waits
            z = self.z_tail[:, :0]
        c = self.c_tail[:, :0]
        if z.shape[1]:
            c, self.state = self.model.ar(z, self.state)
        out = {"z": z[0].numpy(), "c": c[0].numpy()}
        if self.model.predictor is not None:
            z_all, c_all = torch.cat([self.z_tail, z], dim=1), torch.cat([self.c_tail, c], dim=1)
            scores, logprob, _ = prediction_scores(self.model, z_all, c_all, self.window)
            old = self.z_tail.shape[1]
            self.z_tail, self.c_tail = z_all[:, -self.keep :].clone(), c_all[:, -self.keep :].clone()
            out.update(scores=scores[0, old:].numpy(), logprob=logprob[0, old:].numpy())
        return out


def pieces(f: sf.SoundFile, resample: Resampler, samples: int) -> Iterator[np.ndarray]:
    """The audio of open file `f`, through `resample` (mono, 16 kHz, non-finite samples replaced and
    counted), in pieces of `samples` float32 (a multiple of the hop; the last piece shorter, still whole
    hops: trailing samples short of a hop are dropped, as extract() drops them). A file that fails to
    decode part way is a one-line UserError."""
    block = max(1, samples * f.samplerate // SAMPLE_RATE)  # source frames per read
    pending, last = np.zeros(0, np.float32), False
    while not last:
        try:
            x = f.read(block, dtype="float32", always_2d=True)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise UserError(f"cannot read audio file {f.name}: {str(e).splitlines()[0]}") from None
        last = len(x) < block
        pending = np.concatenate([pending, resample(x, last=last)])
        while len(pending) >= samples or (last and len(pending) >= HOP):
            n = min(samples, len(pending) // HOP * HOP)
            yield pending[:n]
            pending = pending[n:]


def features_file(model: nn.Module, path: str, dest: Path, window: int, chunk_seconds: float) -> int:
    """Write the features of audio file `path` to `dest` (.npz, atomically); returns the frame count.
    Warnings (non-finite samples, a file shorter than one hop) go to stderr; a file that cannot be read
    is a UserError and leaves dest as it was."""
    cfg = model.cfg
    rows = {"z": (cfg.enc_dim,), "c": (cfg.ctx_dim,)}
    if model.predictor is not None:
        rows.update(scores=(cfg.n_steps,), logprob=(cfg.n_steps,))
    extractor = Extractor(model, window)
    samples = max(1, round(chunk_seconds * SAMPLE_RATE / HOP)) * HOP
    try:
        with open_audio(path) as f, NpzWriter(rows, dest.parent) as out:
            resample = Resampler(f.samplerate, SAMPLE_RATE)
            for piece in pieces(f, resample, samples):
                for name, value in extractor(piece).items():
                    out.append(name, value)
            for name, value in extractor.finish().items():
                out.append(name, value)
            if resample.nonfinite:
                print(
                    f"cpc-features: warning: {path}: {resample.nonfinite} non-finite samples (NaN or Inf) "
                    "replaced with 0",
                    file=sys.stderr,
                )
            if out.count["c"] == 0:
                print(
                    f"cpc-features: warning: {path}: {f.frames} samples at {f.samplerate} Hz, shorter than one "
                    f"{HOP}-sample frame at {SAMPLE_RATE} Hz: 0 frames",
                    file=sys.stderr,
                )
            out.save(dest, hop=HOP, sample_rate=SAMPLE_RATE)
            return out.count["c"]
    except OSError as e:  # a full disk, a folder removed meanwhile: this file's output only
        raise UserError(f"cannot write {dest}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpc-features", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="cpc-train checkpoint.pt, or a CPC_audio checkpoint (as cpc-export)",
    )
    parser.add_argument("--out", required=True, help="output folder for <name>.npz (created if missing)")
    parser.add_argument(
        "--window", type=int, default=128, help=f"negatives window for logprob, 1..{MAX_WINDOW} frames"
    )
    parser.add_argument(
        "--chunk-seconds", type=float, default=CHUNK_SECONDS,
        help=f"audio run through the model at once, 0.01..3600 s (default {CHUNK_SECONDS}): bounds memory",
    )  # fmt: skip
    parser.add_argument("files", nargs="+", help="audio files")
    args = parser.parse_args(argv)

    def body() -> int:
        if not 1 <= args.window <= MAX_WINDOW:
            raise UserError(f"--window {args.window}: expected 1..{MAX_WINDOW} frames")
        if not 0.01 <= args.chunk_seconds <= 3600:
            raise UserError(f"--chunk-seconds {args.chunk_seconds}: expected 0.01..3600")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder")
        model, _cfg, _step = load_model(args.checkpoint)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
        if not os.access(out, os.W_OK | os.X_OK):
            raise UserError(f"--out {out} is not writable")
        failed, written = [], {}
        for f in args.files:
            dest = out / (Path(f).stem + ".npz")
            try:
                if dest in written:  # one run must not overwrite what it wrote
                    raise UserError(
                        f"{f}: {dest} is already the output of {written[dest]}; rename one of them"
                    )
                frames = features_file(model, f, dest, args.window, args.chunk_seconds)
            except UserError as e:  # one bad file must not lose the others
                print(f"cpc-features: error: {e}", file=sys.stderr)
                failed.append(f)
                continue
            written[dest] = f
            print(f"{dest}: {frames} frames")
        if failed:
            print(
                f"cpc-features: {len(failed)} of {len(args.files)} files could not be read; "
                f"the other {len(written)} are written",
                file=sys.stderr,
            )
            return 2
        return 0

    return run_cli("cpc-features", body)


if __name__ == "__main__":
    sys.exit(main())
