"""cpc-eval ablate: train and probe the paper's Table 2 grid from configuration overrides.

Each row is a separate cpc-train run (in <out>/<row>/, resumed if it exists) followed by the phone probe
on its c_t; the table is written to <out>/ablation.txt and ablation.json with the paper's numbers beside.
"""

from __future__ import annotations

import json
from pathlib import Path

from cpc_stream.errors import UserError

from . import config as config_mod
from . import train as train_mod
from .checkpoint import load_checkpoint, model_from_checkpoint

GRIDS = {
    "steps": [(f"steps={k}", [f"model.n_steps={k}"]) for k in (2, 4, 8, 12, 16)],
    "negatives": [
        ("mixed speaker", ["data.batching=mixed", "negatives.source=batch"]),
        ("same speaker", ["data.batching=same_speaker", "negatives.source=batch"]),
        ("mixed speaker (excl.)", ["data.batching=mixed", "negatives.source=batch_excl_current"]),
        ("same speaker (excl.)", ["data.batching=same_speaker", "negatives.source=batch_excl_current"]),
        ("current sequence only", ["negatives.source=current_sequence"]),
    ],
}
PAPER = {  # Table 2, phone classification accuracy (%)
    "steps=2": 28.5, "steps=4": 57.6, "steps=8": 63.6, "steps=12": 64.6, "steps=16": 63.8,
    "mixed speaker": 64.6, "same speaker": 65.5, "mixed speaker (excl.)": 57.3,
    "same speaker (excl.)": 64.6, "current sequence only": 65.2,
}  # fmt: skip


def run_ablation(args) -> int:
    from .eval import eval_device, load_eval_data, probe_accuracy, split_features

    grids = [g for g in args.grid.split(",") if g]
    unknown = set(grids) - set(GRIDS)
    if unknown:
        raise UserError(f"--grid: unknown {sorted(unknown)} (expected steps, negatives)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_eval_data(args, need_phones=True)
    device = eval_device(args)
    rows = []
    for grid in grids:
        for name, overrides in GRIDS[grid]:
            slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace(".", "").replace("=", "")
            cfg = config_mod.load(args.config, [*args.overrides, *overrides, f"train.out_dir={out / slug}"])
            summary = train_mod.train(cfg, quiet=True)
            model, _ = model_from_checkpoint(load_checkpoint(summary["checkpoint"]))
            acc = probe_accuracy(
                "phone", "cpc", split_features("cpc", model.to(device), data, device), data, args, device
            )
            rows.append({"grid": grid, "name": name, "phone": acc, "paper": PAPER[name], "steps": summary["step"],
                         "final_loss": summary["loss"]})  # fmt: skip
            print(
                f"cpc-eval ablate: {name:24s} phone {100 * acc:5.1f} % (paper {PAPER[name]:.1f})", flush=True
            )
    lines = [f"{'Table 2 row':26s} {'phone acc. (%)':>15s} {'paper':>7s}", "-" * 50]
    lines += [f"{r['name']:26s} {100 * r['phone']:>15.1f} {r['paper']:>7.1f}" for r in rows]
    (out / "ablation.txt").write_text("\n".join(lines) + "\n")
    (out / "ablation.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0
