"""cpc-eval plots: the paper's Figure 3 (prediction accuracy per step k) and Figure 2 (t-SNE of c_t
coloured by speaker), as PNG, on held-out utterances."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import torch

from cpc_stream.audio import load_audio
from cpc_stream.errors import UserError

from .checkpoint import load_checkpoint, model_from_checkpoint
from .config import HOP, SAMPLE_RATE
from .data import WindowBatches, read_split, scan_librispeech, select_ids
from .loss import info_nce, sample_negatives

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@torch.no_grad()
def per_k_accuracy(model, cfg, utts, batches: int = 16, seed: int = 0) -> np.ndarray:
    """InfoNCE accuracy of predicting k = 1..K steps ahead, averaged over `batches` held-out batches."""
    data = WindowBatches(utts, cfg.data.window, cfg.data.batch_size, "mixed", seed)
    frames = cfg.data.window // HOP
    accs = []
    for step in range(batches):
        wav, _ = data[step]
        z, c = model(wav)
        neg = sample_negatives(
            wav.shape[0], frames, cfg.negatives.count, "batch", torch.Generator().manual_seed(step)
        )
        accs.append(info_nce(model, z, c, neg)[1].numpy())
    return np.mean(accs, axis=0)


def make_plots(args) -> int:
    if not args.checkpoint:
        raise UserError("plots need --checkpoint")
    model, cfg = model_from_checkpoint(load_checkpoint(args.checkpoint))
    utts, _ = scan_librispeech(args.root, args.subset)
    test = select_ids(utts, read_split(args.test_split), f"split {args.test_split}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    acc = per_k_accuracy(model, cfg, test)
    k = np.arange(1, len(acc) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(k, 100 * acc, marker="o")
    ax.set(xlabel="latent steps in the future (k)", ylabel="prediction accuracy (%)",
           title="CPC prediction accuracy per step (held-out)", xticks=k)  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fig3_per_k_accuracy.png", dpi=120)
    plt.close(fig)

    from sklearn.manifold import TSNE

    rng = np.random.default_rng(args.seed)
    speakers = sorted({u.speaker for u in test})[:10]
    xs, ys = [], []
    with torch.no_grad():
        for u in test:
            if u.speaker not in speakers:
                continue
            _, c = model(torch.from_numpy(load_audio(u.path, SAMPLE_RATE))[None])
            take = rng.choice(c.shape[1], size=min(40, c.shape[1]), replace=False)
            xs.append(c[0, take].numpy())
            ys += [speakers.index(u.speaker)] * len(take)
    emb = TSNE(n_components=2, perplexity=30, random_state=args.seed, init="pca").fit_transform(
        np.concatenate(xs)
    )
    fig, ax = plt.subplots(figsize=(5, 5))
    sc = ax.scatter(emb[:, 0], emb[:, 1], c=ys, cmap="tab10", s=6)
    handles, _ = sc.legend_elements()
    ax.legend(handles, speakers, title="speaker", fontsize=6, loc="best")
    ax.set(title="t-SNE of c_t, coloured by speaker", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out / "fig2_tsne_speakers.png", dpi=120)
    plt.close(fig)
    (out / "per_k_accuracy.json").write_text(json.dumps({"k": k.tolist(), "accuracy": acc.tolist()}))
    print(f"cpc-eval plots: {out / 'fig3_per_k_accuracy.png'}, {out / 'fig2_tsne_speakers.png'}; "
          "accuracy k=1..K: " + " ".join(f"{a:.2f}" for a in acc))  # fmt: skip
    return 0
