"""InfoNCE over every frame t and every step k, with the negative-sampling modes of the paper's Table 2.

Negatives are indices into the batch's frames flattened to (batch * frames). They are drawn once per
context position (b, t) and shared by all K steps, as CPC_audio does. Which frames are eligible is the
`negatives.source` setting; whether a batch holds one speaker or many is the data sampler's business
(`data.batching`), so "same speaker" and "mixed speaker" are configuration, not code forks:

    paper's Table 2 row            data.batching   negatives.source
    mixed speaker                  mixed           batch
    same speaker                   same_speaker    batch
    mixed speaker (excl.)          mixed           batch_excl_current
    same speaker (excl.)           same_speaker    batch_excl_current
    current sequence only          either          current_sequence
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import CPC


def sample_negatives(
    batch: int, frames: int, count: int, source: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw `count` negative frame indices for every context position: (batch, frames, count) int64
    indices into the batch's frames flattened to (batch * frames)."""
    shape = (batch, frames, count)
    seq = torch.arange(batch)[:, None, None]
    if source == "batch":
        return torch.randint(batch * frames, shape, generator=generator)
    if source == "current_sequence":
        return seq * frames + torch.randint(frames, shape, generator=generator)
    if source == "batch_excl_current":
        if batch < 2:
            raise ValueError("negatives.source=batch_excl_current needs a batch of at least 2 sequences")
        r = torch.randint((batch - 1) * frames, shape, generator=generator)
        other = r // frames
        other = other + (other >= seq)  # skip the current sequence
        return other * frames + r % frames
    raise ValueError(f"unknown negatives source {source!r}")


def info_nce(
    model: CPC, z: torch.Tensor, c: torch.Tensor, neg_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE summed over k = 1..K, each the mean cross-entropy over all valid t (t + k < frames).

    z (B, T, enc_dim), c (B, T, ctx_dim), neg_idx (B, T, N) from sample_negatives.
    Returns the loss (scalar) and the per-k accuracy (K,): how often the positive z_{t+k} outscored
    every negative.
    """
    b, t_len, d = z.shape
    k_max = model.cfg.n_steps
    zs = model.score_space(z)
    preds = model.score_space(model.predict(c))  # (B, T, K, D)
    negs = zs.reshape(b * t_len, d)[neg_idx]  # (B, T, N, D)
    neg_scores = torch.einsum("btkd,btnd->btkn", preds, negs)  # (B, T, K, N)
    losses, accs = [], []
    for k in range(1, k_max + 1):
        n = t_len - k
        pos = (preds[:, :n, k - 1] * zs[:, k:]).sum(-1, keepdim=True)  # (B, n, 1)
        logits = torch.cat([pos, neg_scores[:, :n, k - 1]], dim=-1).float() * model.score_scale
        logits = logits.reshape(b * n, -1)
        target = torch.zeros(b * n, dtype=torch.long, device=z.device)
        losses.append(F.cross_entropy(logits, target))
        # Strictly greater: a collapsed model whose scores all tie must not count as right.
        accs.append((logits[:, 0] > logits[:, 1:].max(-1).values).float().mean())
    return torch.stack(losses).sum(), torch.stack(accs).detach()
