"""cpc-eval: the paper's linear probes (Table 1), its ablations (Table 2) and figures, on your model.

    cpc-eval phone   --checkpoint CKPT --root DIR --train-split F --test-split F --phones F
    cpc-eval speaker --checkpoint CKPT --root DIR --train-split F --test-split F
    cpc-eval table   ...same arguments...         both probes, CPC against MFCC and a random encoder
    cpc-eval ablate  ...data arguments... --out DIR [train.max_steps=1500 ...]   train + probe Table 2
    cpc-eval plots   --checkpoint CKPT --root DIR --test-split F --out DIR   Figure 3 and a t-SNE

CKPT is a cpc-train checkpoint or, for the probes, a CPC_audio one (as cpc-export takes it: the
Libri-light 60k model, say), so that ours and theirs are probed on the same data. A CPC_audio frame has
heard 9.5 ms past its hop, so --label-delay 1 already pairs it with a label whose window it has heard.

Protocol (van den Oord et al., 2018, section 3.1; CPC_audio's linear_separability): a linear softmax
classifier on frozen features, trained on the utterances of train_split.txt and reported as frame
accuracy on test_split.txt; features standardised with the training set's statistics; no averaging over
time. Features: `cpc` (c_t of the checkpoint), `random` (the same architecture at random init), `mfcc`
(13 MFCC + deltas + delta-deltas, 25 ms windows every 10 ms, librosa), `mfcc13` (the 13 coefficients
alone: no deltas, so no look-ahead beyond the labelled window, like the causal c_t), `mfcc-causal` (the
39 features of `mfcc`, read 4 frames late so that they hear no audio that c_t has not heard).

Alignment. A phone label i of converted_aligned_phones.txt describes the 25 ms window of samples
[160 i, 160 i + 400). The causal frame t has seen samples < 160 (t + 1), so frame i + 2 is the first
that has heard the whole window: CPC and random features of frame i + 2 are paired with label i
(--label-delay, default 2). MFCC frame i is computed on exactly label i's window and is paired with it,
so `mfcc`'s deltas (±4 frames) hear 40 ms past the window. `mfcc-causal` pairs MFCC frame i - 4 with
label i: its deltas reach exactly to the end of label i's window, 5 ms less than c_{i+2} has heard.
Speaker labels are the utterance's speaker on every frame.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cpc_stream.audio import load_audio
from cpc_stream.errors import UserError, run_cli
from cpc_stream.probe import LinearProbe

from . import config as config_mod
from .checkpoint import load_model
from .config import SAMPLE_RATE
from .data import Utterance, check_labels, read_phone_labels, read_split, scan_librispeech, select_ids
from .model import CPC
from .probe import fit_linear_probe, save_probe

PAPER = {  # Table 1: phone / speaker accuracy (%)
    "random": (27.6, 1.87),
    "mfcc": (39.7, 17.6),
    "cpc": (64.6, 97.4),
    "supervised": (74.6, 98.5),
}
BASELINES = ("random", "mfcc", "mfcc13", "mfcc-causal")
# Feature frame i + delay is paired with label i; the encoder's features use --label-delay.
MFCC_DELAY = {"mfcc": 0, "mfcc13": 0, "mfcc-causal": -4}
NAMES = {
    "random": "Random initialization",
    "mfcc": "MFCC features",
    "mfcc13": "MFCC, no deltas",
    "mfcc-causal": "MFCC, c_t's look-ahead",
    "cpc": "CPC",
}


def mfcc(wav: np.ndarray) -> np.ndarray:
    """(samples,) -> (frames, 39): 13 MFCC + deltas + delta-deltas, frame i = samples [160 i, 160 i + 400)."""
    import librosa

    m = librosa.feature.mfcc(
        y=wav, sr=SAMPLE_RATE, n_mfcc=13, n_fft=400, win_length=400, hop_length=160, n_mels=40, center=False
    )
    d1 = librosa.feature.delta(m, width=9, mode="nearest")
    d2 = librosa.feature.delta(m, width=9, order=2, mode="nearest")
    return np.concatenate([m, d1, d2]).T.astype(np.float32)


@torch.no_grad()
def features(
    kind: str, model: nn.Module | None, utts: list[Utterance], device: torch.device
) -> list[np.ndarray]:
    """Per utterance: (frames, 39) MFCC features when kind is "mfcc", else (frames, ctx_dim) c_t of model."""
    out = []
    for u in utts:
        wav = load_audio(u.path, SAMPLE_RATE)
        if kind == "mfcc":
            out.append(mfcc(wav))
        else:
            _, c = model(torch.from_numpy(wav)[None].to(device))
            out.append(c[0].float().cpu().numpy())
    return out


def paired(
    feats: list[np.ndarray], labels: list[np.ndarray], delay: int, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pair feature frame i + delay with label i (labels without such a frame are dropped), keep every
    stride-th pair, concatenate utterances. delay may be negative: features that lag their labels."""
    xs, ys = [], []
    for f, lab in zip(feats, labels, strict=True):
        first, end = max(0, -delay), min(len(lab), len(f) - delay)  # labels first .. end - 1
        xs.append(f[first + delay : end + delay : stride])
        ys.append(lab[first:end:stride])
    return np.concatenate(xs), np.concatenate(ys)


def probe_accuracy(
    task: str,
    kind: str,
    feats: dict[str, list[np.ndarray]],
    data: dict,
    args,
    device: torch.device,
    save: Path | None = None,
) -> float:
    """Train the linear probe of `task` on the train-split features of `kind`; frame accuracy on the test split.
    feats: {"train": [(frames, dim) per utterance], "test": [...]} in the order of data["train"/"test"]."""
    delay = MFCC_DELAY.get(kind, args.label_delay)
    sets = {}
    for split in ("train", "test"):
        utts = data[split]
        if task == "phone":
            labels = [data["phones"][u.id] for u in utts]
        else:
            labels = [
                np.full(max(len(f) + delay, 0), data["speaker_index"][u.speaker])
                for f, u in zip(feats[split], utts, strict=True)
            ]
        sets[split] = paired(feats[split], labels, delay, args.frame_stride)
    classes = data["n_phones"] if task == "phone" else len(data["speaker_index"])
    (xtr, ytr), (xte, yte) = sets["train"], sets["test"]
    fitted = fit_linear_probe(xtr, ytr, classes, device=device)
    names = (
        [str(i) for i in range(classes)]
        if task == "phone"
        else sorted(data["speaker_index"], key=data["speaker_index"].get)
    )
    if save is not None:
        save_probe(save, fitted, names)
    return float((LinearProbe(**fitted, classes=names).predict(xte) == yte).mean())


def split_features(
    kind: str, model: nn.Module | None, data: dict, device: torch.device
) -> dict[str, list[np.ndarray]]:
    return {split: features(kind, model, data[split], device) for split in ("train", "test")}


def load_eval_data(args, need_phones: bool) -> dict:
    utts, _ = scan_librispeech(args.root, args.subset)
    data = {
        "train": select_ids(utts, read_split(args.train_split), f"split {args.train_split}"),
        "test": select_ids(utts, read_split(args.test_split), f"split {args.test_split}"),
    }
    speakers = sorted({u.speaker for u in data["train"]})
    missing = sorted({u.speaker for u in data["test"]} - set(speakers))
    if missing:
        raise UserError(f"test split has speakers absent from the train split: {', '.join(missing[:5])}")
    data["speaker_index"] = {s: i for i, s in enumerate(speakers)}
    if need_phones:
        if not args.phones:
            raise UserError("the phone probe needs --phones (converted_aligned_phones.txt)")
        phones = read_phone_labels(args.phones)
        for split in ("train", "test"):
            check_labels(data[split], phones, f"{split} split")
        data["phones"] = phones
        data["n_phones"] = int(max(int(v.max()) for v in phones.values()) + 1)
    return data


def encoders(args, device: torch.device) -> dict[str, nn.Module | None]:
    """The feature extractors to compare: cpc (if a checkpoint is given: cpc-train's or CPC_audio's),
    random (the same architecture at random init), mfcc."""
    out: dict[str, nn.Module | None] = {}
    model = CPC(config_mod.Config().model)
    if args.checkpoint:
        model, _, _ = load_model(args.checkpoint)
        out["cpc"] = model.to(device)
    kinds = [b for b in args.baselines.split(",") if b]
    if "random" in kinds:
        torch.manual_seed(args.seed)
        out["random"] = type(model)(model.cfg).eval().to(device)
    for kind in MFCC_DELAY:
        if kind in kinds:
            out[kind] = None
    unknown = set(kinds) - set(BASELINES)
    if unknown:
        raise UserError(f"--baselines: unknown {sorted(unknown)} (expected {', '.join(BASELINES)})")
    if not out:
        raise UserError("nothing to evaluate: give --checkpoint and/or --baselines")
    return out


def eval_device(args) -> torch.device:
    """CUDA when present unless --device cpu."""
    return torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")


def run_probes(args, tasks: list[str]) -> dict:
    device = eval_device(args)
    data = load_eval_data(args, "phone" in tasks)
    results: dict = {"tasks": tasks, "accuracy": {}, "frames_stride": args.frame_stride, "label_delay": args.label_delay,
                     "train_utterances": len(data["train"]), "test_utterances": len(data["test"]),
                     "speakers": len(data["speaker_index"]), "phone_classes": data.get("n_phones")}  # fmt: skip
    save_dir = Path(args.save_probes) if args.save_probes else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    mfcc_feats = None  # one MFCC pass over the data serves every MFCC baseline
    for kind, model in encoders(args, device).items():
        if kind in MFCC_DELAY:
            mfcc_feats = mfcc_feats or split_features("mfcc", None, data, device)
            columns = 13 if kind == "mfcc13" else None  # mfcc13: the coefficients without deltas
            feats = {split: [f[:, :columns] for f in fs] for split, fs in mfcc_feats.items()}
        else:
            feats = split_features(kind, model, data, device)
        for task in tasks:
            save = save_dir / f"{kind}_{task}_probe.npz" if save_dir else None
            acc = probe_accuracy(task, kind, feats, data, args, device, save)
            results["accuracy"].setdefault(kind, {})[task] = acc
            print(f"cpc-eval: {task:7s} {NAMES[kind]:22s} {100 * acc:6.2f} %", file=sys.stderr, flush=True)
    return results


def format_table(results: dict) -> str:
    """The paper's Table 1 layout, ours beside the paper's numbers."""
    lines = [
        f"{'Method':24s} {'Phone acc. (%)':>15s} {'paper':>7s} {'Speaker acc. (%)':>17s} {'paper':>7s}",
        "-" * 74,
    ]
    for kind in (*BASELINES, "cpc"):
        if kind not in results["accuracy"]:
            continue
        acc = results["accuracy"][kind]
        ph = f"{100 * acc['phone']:.1f}" if "phone" in acc else "-"
        sp = f"{100 * acc['speaker']:.1f}" if "speaker" in acc else "-"
        paper = PAPER.get(kind, ("-", "-"))
        lines.append(f"{NAMES[kind]:24s} {ph:>15s} {paper[0]:>7} {sp:>17s} {paper[1]:>7}")
    lines.append(f"({results['train_utterances']} train / {results['test_utterances']} test utterances, "
                 f"{results['speakers']} speakers, {results['phone_classes'] or '-'} phone classes; paper: LibriSpeech-100, 41 / 251)")  # fmt: skip
    return "\n".join(lines)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, help="LibriSpeech-layout root")
    p.add_argument("--subset", default="train-clean-100")
    p.add_argument("--train-split", required=True)
    p.add_argument("--test-split", required=True)
    p.add_argument("--phones", help="converted_aligned_phones.txt")
    p.add_argument("--checkpoint", help="cpc-train or CPC_audio checkpoint (omit to run baselines only)")
    p.add_argument(
        "--baselines",
        default="random,mfcc",
        help="comma list of random, mfcc, mfcc13 (no deltas), mfcc-causal (c_t's look-ahead), or ''",
    )
    p.add_argument("--label-delay", type=int, default=2, help="causal frame i + delay is paired with label i")
    p.add_argument(
        "--frame-stride", type=int, default=1, help="keep every n-th frame (memory on the full set)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init encoder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"])
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--save-probes", metavar="DIR", help="save each trained probe (for examples/live_classifier.py)"
    )


def cmd_probes(args, tasks: list[str]) -> int:
    results = run_probes(args, tasks)
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpc-eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("phone", "speaker", "table"):
        add_data_args(sub.add_parser(name, help=f"{name} probe(s)"))
    ab = sub.add_parser("ablate", help="train and probe the Table 2 grid")
    add_data_args(ab)
    ab.add_argument("--config", default="config.yaml")
    ab.add_argument("--grid", default="steps,negatives", help="steps, negatives or both")
    ab.add_argument("--out", required=True, help="folder for the runs and the table")
    ab.add_argument("overrides", nargs="*", help="config overrides applied to every run")
    pl = sub.add_parser("plots", help="Figure 3 (per-k accuracy) and a t-SNE of c_t by speaker")
    add_data_args(pl)
    pl.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    def body() -> int:
        if args.cmd in ("phone", "speaker"):
            return cmd_probes(args, [args.cmd])
        if args.cmd == "table":
            return cmd_probes(args, ["phone", "speaker"])
        if args.cmd == "ablate":
            from .ablate import run_ablation

            return run_ablation(args)
        from .plots import make_plots

        return make_plots(args)

    return run_cli("cpc-eval", body)


if __name__ == "__main__":
    sys.exit(main())
