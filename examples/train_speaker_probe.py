"""Fit a speaker probe on c_t of the bundled train-clean-100 utterances, for examples/live_classifier.py.

    python examples/train_speaker_probe.py --checkpoint runs/demo/checkpoint.pt --out runs/demo/speaker_probe.npz

The first 70% of each utterance's frames train the probe, the rest test it (the bundled set is 9
utterances of 6 speakers: this shows the plumbing, not the paper's number; cpc-eval does that).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from cpc_training.checkpoint import load_checkpoint, model_from_checkpoint
from cpc_training.data import scan_librispeech
from cpc_training.features import extract
from cpc_training.probe import fit_linear_probe, save_probe

from cpc_stream.audio import load_audio
from cpc_stream.probe import LinearProbe

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--root", default=str(REPO / "data/librispeech-mini"))
    args = ap.parse_args()
    model, _ = model_from_checkpoint(load_checkpoint(args.checkpoint))
    utts, _ = scan_librispeech(args.root, "train-clean-100")
    speakers = sorted({u.speaker for u in utts})
    parts = {"train": ([], []), "test": ([], [])}
    for u in utts:
        c = extract(model, load_audio(u.path, 16000))["c"]
        cut = int(0.7 * len(c))
        label = speakers.index(u.speaker)
        for name, sl in (("train", slice(0, cut)), ("test", slice(cut, None))):
            parts[name][0].append(c[sl])
            parts[name][1].append(np.full(len(c[sl]), label))
    (xtr, ytr), (xte, yte) = ((np.concatenate(a), np.concatenate(b)) for a, b in parts.values())
    fitted = fit_linear_probe(xtr, ytr, len(speakers))
    acc = float((LinearProbe(**fitted, classes=speakers).predict(xte) == yte).mean())
    save_probe(args.out, fitted, speakers)
    print(
        f"speaker probe: {len(speakers)} speakers, {len(xtr)} train / {len(xte)} test frames, "
        f"test frame accuracy {acc:.3f} (chance {1 / len(speakers):.3f}); saved {args.out}"
    )


if __name__ == "__main__":
    main()
