"""The causal CPC model (van den Oord et al., 2018, section 3.1), one definition for training, offline
feature extraction and the streaming export.

    wav (batch, samples) --g_enc--> z (batch, frames, enc_dim) --GRU--> c (batch, frames, ctx_dim)
    predictions W_k c_t for k = 1..K, scored against z_{t+k}

Every conv is padded on the left only, by kernel - stride, so 160*T samples give exactly T frames and
frame t depends only on samples < 160*(t+1). Normalisation is per frame (none or channel norm), never over
time, so the model can run one hop at a time with explicit state and give the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CAUSAL_PADS, HOP, KERNELS, STRIDES, ModelConfig


class ChannelNorm(nn.Module):
    """Normalise each frame over its channels, with a learned per-channel affine (CPC_audio's ChannelNorm).

    Input and output (batch, channels, frames); statistics never mix frames, so it is causal. The
    variance is the biased one (divided by C) on purpose, so that the exported graph computes it with
    one ONNX LayerNormalization; CPC_audio's ChannelNorm uses the unbiased one (divided by C - 1).
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class Encoder(nn.Module):
    """g_enc: five strided Conv1d layers with left padding, each followed by a per-frame norm and ReLU."""

    left_pads = CAUSAL_PADS  # zeros in front of each conv's input; no look-ahead

    def __init__(self, dim: int, norm: str):
        super().__init__()
        chans = [1] + [dim] * len(KERNELS)
        self.convs = nn.ModuleList(
            nn.Conv1d(chans[i], chans[i + 1], KERNELS[i], STRIDES[i]) for i in range(len(KERNELS))
        )
        # Zero biases make the untrained encoder scale-equivariant (ReLU convs without bias), so quiet
        # speech (LibriSpeech rms ~0.05) still gives distinct frames instead of the bias pattern
        # everywhere; without this the cosine score started at cosine similarity ~0.998 between all
        # frames and training sat at chance.
        for conv in self.convs:
            nn.init.zeros_(conv.bias)
        self.norms = nn.ModuleList(ChannelNorm(dim) if norm == "channel" else nn.Identity() for _ in KERNELS)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (batch, samples) -> z (batch, samples // 160, dim). Trailing samples short of a hop are dropped."""
        return self.chunk(wav[:, : wav.shape[-1] // HOP * HOP], None)[0]

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor, tuple | None]]:
        """The encoder as the streaming step computes it, per layer: conv weight (out, in, kernel), bias
        (out,), and the norm after it as ONNX LayerNormalization's (weight (C,), bias (C,), eps), or None."""
        return [
            (conv.weight, conv.bias, (norm.weight.flatten(), norm.bias.flatten(), norm.eps))
            if isinstance(norm, ChannelNorm)
            else (conv.weight, conv.bias, None)
            for conv, norm in zip(self.convs, self.norms, strict=True)
        ]

    def chunk(
        self, wav: torch.Tensor, context: list[torch.Tensor] | None, last: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder on one piece of a longer audio, after the pieces that left `context` (None: the
        start, where every layer sees zeros, its left padding). wav (batch, samples), a whole number of
        160-sample hops (at least one) -> z (batch, samples // 160, dim) and the context for the next
        piece: each layer's last kernel - stride input steps, (batch, channels, kernel - stride). Pieces
        give the frames of the whole audio run at once (to float rounding). `last` is not needed: no
        frame waits for later audio."""
        x, new_context = wav[:, None, :], []
        for i, (conv, norm, k, s) in enumerate(zip(self.convs, self.norms, KERNELS, STRIDES, strict=True)):
            x = F.pad(x, (k - s, 0)) if context is None else torch.cat([context[i], x], dim=-1)
            new_context.append(x[..., x.shape[-1] - (k - s) :].clone())  # a copy: x itself can be freed
            x = torch.relu(norm(conv(x)))
        return x.transpose(1, 2), new_context


class CPC(nn.Module):
    """Encoder, GRU context network and the K linear step predictors W_k (ctx_dim -> enc_dim)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.enc_dim, cfg.norm)
        self.gru = nn.GRU(cfg.enc_dim, cfg.ctx_dim, batch_first=True)
        # All K predictors in one matrix: output k-1 of the reshaped result is W_k c.
        self.predictor = nn.Linear(cfg.ctx_dim, cfg.n_steps * cfg.enc_dim, bias=False)

    lookahead = 0  # samples after its hop that a frame depends on: none, the model is causal

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav (batch, samples) -> z (batch, frames, enc_dim), c (batch, frames, ctx_dim)."""
        z = self.encoder(wav)
        c, _ = self.gru(z)
        return z, c

    @property
    def ar(self) -> nn.GRU:
        """The context network (what the tools that also run CPC_audio's models call it)."""
        return self.gru

    def predict(self, c: torch.Tensor) -> torch.Tensor:
        """c (..., ctx_dim) -> W_k c for every k: (..., K, enc_dim)."""
        return self.predictor(c).unflatten(-1, (self.cfg.n_steps, self.cfg.enc_dim))

    # The score function is configuration; export and the daemon compute whichever one was trained.
    def score_space(self, x: torch.Tensor) -> torch.Tensor:
        """Map z or W_k c into the space where a plain dot product times score_scale is the score."""
        return F.normalize(x, dim=-1) if self.cfg.score == "cosine" else x

    @property
    def score_scale(self) -> float:
        return {"cosine": 1.0 / self.cfg.temperature, "dot": 1.0, "dot_scaled": 1.0 / self.cfg.enc_dim}[
            self.cfg.score
        ]


MAX_WINDOW = 4096  # the largest negatives window the tools accept (frames: 41 s)


def prediction_scores(
    model: CPC, z: torch.Tensor, c: torch.Tensor, window: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offline k-step prediction scores, the reference the streaming graph must reproduce.

    For frame t and step k (1..K): raw score s_k(t) = score(z_t, W_k c_{t-k}); log-probability
    log p_k(t) = s_k(t) - logsumexp(s_k(t), score(z_{t-1-j}, W_k c_{t-k}) for j < window, t-1-j >= 0),
    i.e. how expected z_t was among the last `window` frames of the same stream.

    z (batch, T, enc_dim), c (batch, T, ctx_dim) -> scores, logprob (batch, T, K) float32 with NaN where
    invalid, and valid (T, K) bool: valid iff t - k >= 0.
    """
    b, t_len, _ = z.shape
    k_max = model.cfg.n_steps
    scale = model.score_scale
    zs = model.score_space(z)  # (b, T, D)
    preds = torch.zeros(b, t_len, k_max, z.shape[-1], dtype=z.dtype, device=z.device)
    p_all = model.predict(c)  # (b, T, K, D): p_all[:, s, k-1] = W_k c_s
    for k in range(1, k_max + 1):
        if k < t_len:
            preds[:, k:, k - 1] = p_all[:, : t_len - k, k - 1]  # aligned to the target frame t
    ps = model.score_space(preds)
    pos = (ps * zs[:, :, None, :]).sum(-1) * scale  # (b, T, K)
    # Negatives: z_{t-window} .. z_{t-1}; frames before the stream are masked out.
    zpad = F.pad(zs, (0, 0, window, 0))  # (b, window + T, D)
    negs = zpad.unfold(1, window, 1)[:, :t_len]  # (b, T, D, window): column j is frame t - window + j
    neg = torch.einsum("btkd,btdw->btkw", ps, negs) * scale
    frame = torch.arange(t_len, device=z.device)
    neg_ok = (frame[:, None] - window + torch.arange(window, device=z.device)[None, :]) >= 0  # (T, window)
    neg = neg.masked_fill(~neg_ok[None, :, None, :], float("-inf"))
    logprob = pos - torch.logsumexp(torch.cat([pos[..., None], neg], dim=-1), dim=-1)
    valid = (frame[:, None] - torch.arange(1, k_max + 1, device=z.device)[None, :]) >= 0  # (T, K)
    nan = torch.tensor(float("nan"), dtype=pos.dtype, device=z.device)
    return torch.where(valid, pos, nan), torch.where(valid, logprob, nan), valid
