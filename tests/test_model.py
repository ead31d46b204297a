"""The model is causal and frame-exact: the property streaming rests on."""

import pytest
import torch
from cpc_training.config import HOP, ModelConfig
from cpc_training.model import CPC, prediction_scores


@pytest.mark.parametrize("norm", ["none", "channel"])
def test_160T_samples_give_exactly_T_frames(norm):
    model = CPC(ModelConfig(enc_dim=32, ctx_dim=16, n_steps=3, norm=norm))
    for t in (1, 7, 64):
        z, c = model(torch.randn(2, HOP * t))
        assert z.shape == (2, t, 32) and c.shape == (2, t, 16)
    z, _ = model(torch.randn(1, HOP * 5 + 159))  # a partial hop is not a frame
    assert z.shape[1] == 5


@pytest.mark.parametrize("norm", ["none", "channel"])
def test_future_samples_never_change_past_frames(norm):
    """Changing samples at or after 160*(t+1) leaves frames 0..t of z and c bit-identical."""
    torch.manual_seed(0)
    model = CPC(ModelConfig(enc_dim=64, ctx_dim=32, n_steps=4, norm=norm)).eval()
    wav = torch.randn(1, HOP * 40)
    with torch.no_grad():
        z0, c0 = model(wav)
        for t in (0, 1, 13, 38):
            edited = wav.clone()
            edited[:, HOP * (t + 1) :] = torch.randn(1, wav.shape[1] - HOP * (t + 1)) * 3
            z1, c1 = model(edited)
            assert torch.equal(z1[:, : t + 1], z0[:, : t + 1]), f"z frames <= {t} saw the future"
            assert torch.equal(c1[:, : t + 1], c0[:, : t + 1]), f"c frames <= {t} saw the future"
            assert not torch.equal(z1[:, t + 1], z0[:, t + 1]), "the edit must reach frame t+1"


def test_offline_scores_match_their_definition():
    """s_k(t) = score(z_t, W_k c_{t-k}); logprob normalises against z of the last `window` frames."""
    torch.manual_seed(1)
    model = CPC(ModelConfig(enc_dim=16, ctx_dim=8, n_steps=3, score="cosine", temperature=0.5)).eval()
    window = 4
    with torch.no_grad():
        z, c = model(torch.randn(1, HOP * 12))
        scores, logprob, valid = prediction_scores(model, z, c, window)
        w = model.predictor.weight.view(3, 16, 8)
        cos = torch.nn.functional.cosine_similarity
        for t in range(12):
            for k in range(1, 4):
                if t - k < 0:
                    assert not valid[t, k - 1] and torch.isnan(scores[0, t, k - 1])
                    continue
                p = w[k - 1] @ c[0, t - k]
                s = cos(z[0, t], p, dim=0) / 0.5
                negs = [cos(z[0, j], p, dim=0) / 0.5 for j in range(max(0, t - window), t)]
                lp = s - torch.logsumexp(torch.stack([s, *negs]), 0)
                assert scores[0, t, k - 1] == pytest.approx(s.item(), abs=1e-5)
                assert logprob[0, t, k - 1] == pytest.approx(lp.item(), abs=1e-5)
