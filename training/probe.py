"""Linear probes on frozen features: a softmax classifier fitted with full-batch L-BFGS, saved in the
format that the torch-free runtime (cpc_stream.probe.LinearProbe) applies live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def fit_linear_probe(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    weight_decay: float = 1e-4,
    steps: int = 200,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """x (frames, dim) float32, y (frames,) int in [0, n_classes) -> {"W" (n_classes, dim), "b", "mean", "std"}.

    Features are standardised with the training set's mean and std (stored with the probe)."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    xt = torch.from_numpy((x - mean) / std).float().to(device)
    yt = torch.from_numpy(y).long().to(device)
    torch.manual_seed(0)
    layer = torch.nn.Linear(x.shape[1], n_classes).to(device)
    opt = torch.optim.LBFGS(
        layer.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(xt), yt) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {
        "W": layer.weight.detach().cpu().numpy().astype(np.float32),
        "b": layer.bias.detach().cpu().numpy().astype(np.float32),
        "mean": mean.astype(np.float32),
        "std": std.astype(np.float32),
    }


def save_probe(
    path: str | Path, probe: dict[str, np.ndarray], classes: list[str], feature: str = "c"
) -> None:
    np.savez(path, **probe, classes=np.array(classes), feature=np.array(feature))
