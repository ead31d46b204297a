"""cpc-features: offline z_t, c_t and k-step prediction scores for audio files, from a checkpoint.

    cpc-features --checkpoint runs/cpc/checkpoint.pt --out feats/ a.flac b.wav ...

Writes feats/<name>.npz with z (frames, enc_dim), c (frames, ctx_dim), scores and logprob (frames, K;
NaN where t - k < 0) as float32, and hop / sample_rate. Any format, rate and channel count soundfile
reads is accepted (mixed to mono, resampled with soxr). This is the whole-utterance reference that the
streaming graph and the daemon are checked against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from cpc_stream.audio import load_audio
from cpc_stream.errors import UserError, run_cli

from .config import HOP, SAMPLE_RATE
from .model import CPC, prediction_scores
from .train import load_checkpoint, model_from_checkpoint


@torch.no_grad()
def extract(model: CPC, wav: np.ndarray, window: int = 128) -> dict[str, np.ndarray]:
    """wav (samples,) float32 at 16 kHz -> dict of z, c, scores, logprob, each (frames, ...) float32."""
    x = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[None]
    z, c = model(x)
    scores, logprob, _ = prediction_scores(model, z, c, window)
    return {
        "z": z[0].numpy(),
        "c": c[0].numpy(),
        "scores": scores[0].numpy(),
        "logprob": logprob[0].numpy(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cpc-features", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="cpc-train checkpoint.pt")
    parser.add_argument("--out", required=True, help="output folder for <name>.npz")
    parser.add_argument("--window", type=int, default=128, help="negatives window for logprob (frames)")
    parser.add_argument("files", nargs="+", help="audio files")
    args = parser.parse_args(argv)

    def body() -> int:
        model, _cfg = model_from_checkpoint(load_checkpoint(args.checkpoint))
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
        failed = 0
        for f in args.files:
            try:
                wav = load_audio(f, SAMPLE_RATE)
            except UserError as e:  # one bad file must not lose the others
                print(f"cpc-features: error: {e}", file=sys.stderr)
                failed += 1
                continue
            feats = extract(model, wav, args.window)
            dest = out / (Path(f).stem + ".npz")
            np.savez(dest, **feats, hop=HOP, sample_rate=SAMPLE_RATE)
            print(f"{dest}: {feats['c'].shape[0]} frames")
        if failed:
            raise UserError(f"{failed} of {len(args.files)} files could not be read")
        return 0

    return run_cli("cpc-features", body)


if __name__ == "__main__":
    sys.exit(main())
