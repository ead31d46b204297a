"""A trained linear probe applied to c_t without torch, with a smoothed frame-by-frame decision."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError


class LinearProbe:
    """Softmax classifier over standardised features: W (classes, dim), b (classes,), mean and std (dim,),
    as fitted by cpc_training.probe.fit_linear_probe and saved by save_probe."""

    def __init__(self, W: np.ndarray, b: np.ndarray, mean: np.ndarray, std: np.ndarray, classes: list[str]):
        self.W, self.b, self.mean, self.std, self.classes = W, b, mean, std, list(classes)
        self.dim = W.shape[1]

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        try:
            d = np.load(path)
            return cls(d["W"], d["b"], d["mean"], d["std"], [str(c) for c in d["classes"]])
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"probe file {path} is not a cpc-stream linear probe ({e})") from None

    def log_probs(self, feats: np.ndarray) -> np.ndarray:
        """feats (frames, dim) -> (frames, classes) log-probabilities."""
        if feats.shape[-1] != self.dim:
            raise UserError(f"probe expects {self.dim}-d features, the stream sends {feats.shape[-1]}-d")
        logits = ((feats - self.mean) / self.std) @ self.W.T + self.b
        logits -= logits.max(axis=-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """feats (frames, dim) -> most probable class index per frame (frames,)."""
        return self.log_probs(feats).argmax(axis=-1)


class Smoother:
    """Exponential moving average of class probabilities; the decision is its argmax.

    `seconds` is the time constant at 100 frames per second."""

    def __init__(self, n_classes: int, seconds: float = 0.5):
        self.alpha = 1.0 - np.exp(-1.0 / max(seconds * 100, 1e-6))
        self.p = np.full(n_classes, 1.0 / n_classes)

    def update(self, log_probs: np.ndarray) -> np.ndarray:
        """log_probs (frames, classes) -> smoothed decision index per frame (frames,)."""
        out = np.empty(len(log_probs), dtype=np.int64)
        for i, lp in enumerate(np.exp(log_probs)):
            self.p += self.alpha * (lp - self.p)
            out[i] = int(self.p.argmax())
        return out
