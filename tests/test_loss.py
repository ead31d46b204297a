"""InfoNCE against a slow, obviously-correct loop, for every negative-sampling mode."""

import math

import pytest
import torch
from cpc_training.config import ModelConfig
from cpc_training.loss import info_nce, sample_negatives
from cpc_training.model import CPC


@torch.no_grad()
def reference_info_nce(model, z, c, neg_idx):
    """Loop over k, b, t: -log softmax of the positive among [positive, negatives], float64."""
    b_n, t_n, d = z.shape
    k_n = model.cfg.n_steps
    w = model.predictor.weight.double().view(k_n, d, -1)
    flat = z.double().reshape(b_n * t_n, d)

    def score(a, p):
        if model.cfg.score == "cosine":
            return torch.dot(a, p) / (a.norm() * p.norm()) / model.cfg.temperature
        return torch.dot(a, p) * (1.0 / d if model.cfg.score == "dot_scaled" else 1.0)

    total, accs = 0.0, []
    for k in range(1, k_n + 1):
        losses, hits = [], []
        for b in range(b_n):
            for t in range(t_n - k):
                p = w[k - 1] @ c[b, t].double()
                pos = score(z[b, t + k].double(), p)
                neg = [score(flat[j], p) for j in neg_idx[b, t].tolist()]
                logits = torch.stack([pos, *neg])
                losses.append(-(pos - torch.logsumexp(logits, 0)))
                hits.append(bool(pos > max(neg)))
        total += sum(losses) / len(losses)
        accs.append(sum(hits) / len(hits))
    return float(total), accs


@pytest.mark.parametrize("source", ["batch", "batch_excl_current", "current_sequence"])
@pytest.mark.parametrize("score", ["cosine", "dot", "dot_scaled"])
def test_loss_and_accuracy_match_reference(source, score):
    torch.manual_seed(0)
    model = CPC(ModelConfig(enc_dim=8, ctx_dim=6, n_steps=3, score=score, temperature=0.3)).double()
    b, t, n = 3, 7, 5
    z, c = torch.randn(b, t, 8, dtype=torch.float64), torch.randn(b, t, 6, dtype=torch.float64)
    neg = sample_negatives(b, t, n, source, torch.Generator().manual_seed(1))
    loss, acc = info_nce(model, z, c, neg)
    ref_loss, ref_acc = reference_info_nce(model, z, c, neg)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert acc.tolist() == pytest.approx(ref_acc)


def test_negative_pools_follow_the_source_setting():
    b, t, n = 4, 10, 200
    g = torch.Generator().manual_seed(0)
    seq_of = lambda idx: idx // t  # noqa: E731
    own = torch.arange(b)[:, None, None]
    cur = sample_negatives(b, t, n, "current_sequence", g)
    assert (seq_of(cur) == own).all()
    excl = sample_negatives(b, t, n, "batch_excl_current", g)
    assert (seq_of(excl) != own).all() and set(seq_of(excl).unique().tolist()) == set(range(b))
    anyb = sample_negatives(b, t, n, "batch", g)
    assert (seq_of(anyb) == own).any() and (seq_of(anyb) != own).any()
    for idx in (cur, excl, anyb):
        assert idx.min() >= 0 and idx.max() < b * t and idx.shape == (b, t, n)


def test_untrained_loss_is_chance_and_collapsed_scores_are_not_counted_right():
    """With all-equal scores the loss is ln(N+1) per step and no prediction counts as correct."""
    model = CPC(ModelConfig(enc_dim=8, ctx_dim=4, n_steps=2, score="dot"))
    z, c = torch.zeros(2, 6, 8), torch.zeros(2, 6, 4)
    loss, acc = info_nce(model, z, c, sample_negatives(2, 6, 9, "batch"))
    assert loss.item() == pytest.approx(2 * math.log(10), rel=1e-6)
    assert acc.sum().item() == 0.0
