"""The CPC model as a streaming step with explicit state: what cpc-export turns into ONNX.

One call consumes F hops (F * 160 samples) for B independent streams and returns, per hop, z_t, c_t and
the k-step prediction scores, plus the new state. A zero state is the start of a stream; resetting a
stream is zeroing its rows. Run hop after hop, it reproduces CPC.forward and prediction_scores on the
whole utterance (to float rounding).

State (batch first; C = enc_dim, H = ctx_dim, K = n_steps, W = negatives window):
    cache_conv1 (B, 5, 1)   last raw samples           cache_conv2..5 (B, 4|2|2|2, C) last conv outputs
    gru_h        (B, H)         GRU hidden state
    pred_history (B, K, K, C)   W_1..W_K c_s for the K frames s = t-K .. t-1, in score space
    z_history    (B, W, C)      z_s for the W frames s = t-W .. t-1, in score space
    frame_index  (B,) int64     frames this stream has produced so far
"In score space" means unit-normalised when the score is cosine, unchanged otherwise, so that no stored
vector is normalised twice. The history is kept as predictions rather than contexts so that each call
multiplies only its own new c_t by the predictor matrix.

Layout: channels last, and each conv is one matrix product. Every kernel is twice its stride, so with the
cache of `stride` previous inputs in front, the input folds into blocks of `stride` time steps and output
j is [block j, block j+1] @ W. This reads each weight once per call and needs no im2col copy.
"""

from __future__ import annotations

import torch
from cpc_training.config import KERNELS, STRIDES
from cpc_training.model import CPC
from torch import nn

from cpc_stream.engine import STATE_NAMES


def state_shapes(model: CPC, window: int) -> dict[str, list[int | str]]:
    """State shapes with "B" for the batch axis."""
    c, h, k = model.cfg.enc_dim, model.cfg.ctx_dim, model.cfg.n_steps
    shapes: dict[str, list[int | str]] = {"cache_conv1": ["B", STRIDES[0], 1]}
    for i in range(1, len(STRIDES)):
        shapes[f"cache_conv{i + 1}"] = ["B", STRIDES[i], c]
    shapes.update(gru_h=["B", h], pred_history=["B", k, k, c], z_history=["B", window, c], frame_index=["B"])
    return shapes


def zero_state(model: CPC, window: int, batch: int) -> list[torch.Tensor]:
    shapes = state_shapes(model, window)
    return [
        torch.zeros(
            [batch if d == "B" else d for d in shapes[n]],
            dtype=torch.int64 if n == "frame_index" else torch.float32,
        )
        for n in STATE_NAMES
    ]


class StreamingCPC(nn.Module):
    """A trained CPC model run F hops at a time with explicit state (see the module docstring)."""

    def __init__(self, model: CPC, frames_per_call: int, window: int, gru_as_matmuls: bool = False):
        super().__init__()
        assert all(k == 2 * s for k, s in zip(KERNELS, STRIDES, strict=True)), (
            "conv folding needs kernel = 2 x stride"
        )
        cfg = model.cfg
        self.frames, self.window, self.k = frames_per_call, window, cfg.n_steps
        self.cosine = cfg.score == "cosine"
        self.scale = model.score_scale
        # Conv1d weight (out, in, kernel) -> (kernel * in, out) in time-major order, as blocks are laid out.
        self.conv_w = nn.ParameterList(
            nn.Parameter(conv.weight.detach().permute(2, 1, 0).reshape(-1, conv.out_channels).clone())
            for conv in model.encoder.convs
        )
        self.conv_b = nn.ParameterList(
            nn.Parameter(conv.bias.detach().clone()) for conv in model.encoder.convs
        )
        self.norm = cfg.norm == "channel"
        if self.norm:
            self.norm_w = nn.ParameterList(
                nn.Parameter(n.weight.detach().flatten().clone()) for n in model.encoder.norms
            )
            self.norm_b = nn.ParameterList(
                nn.Parameter(n.bias.detach().flatten().clone()) for n in model.encoder.norms
            )
            self.eps = model.encoder.norms[0].eps
        self.gru = nn.GRU(cfg.enc_dim, cfg.ctx_dim, batch_first=True)
        self.gru.load_state_dict(model.gru.state_dict())
        # The int8 variant spells the GRU out as two matrix products per frame plus its gates, so that
        # its weights can be quantised like the others (onnxruntime has no quantised GRU operator).
        self.gru_as_matmuls = gru_as_matmuls
        if gru_as_matmuls:  # stored transposed, so that every frame's product reads the same constant
            self.gru_w_ih = nn.Parameter(model.gru.weight_ih_l0.detach().t().contiguous())  # (C, 3H)
            self.gru_w_hh = nn.Parameter(model.gru.weight_hh_l0.detach().t().contiguous())  # (H, 3H)
        # Predictor (K*C, H) -> (H, K*C): one plain GEMM gives every W_k c_t of a frame.
        self.pred_w = nn.Parameter(model.predictor.weight.detach().t().contiguous())
        # The prediction aimed at new frame i by step j was made at frame t0 + i - j by predictor j:
        # row K + i - j, column j - 1 of [history, new], flattened to one index for a single Gather.
        k = cfg.n_steps
        aim = [(k + i - j) * k + (j - 1) for i in range(frames_per_call) for j in range(1, k + 1)]
        self.register_buffer("aim", torch.tensor(aim, dtype=torch.int64), persistent=False)

    def _encode(
        self, audio: torch.Tensor, caches: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = audio.unsqueeze(-1)  # (B, F*160, 1)
        new_caches = []
        for i, stride in enumerate(STRIDES):
            xp = torch.cat([caches[i], x], dim=1)  # (B, stride * (n + 1), Cin)
            new_caches.append(xp[:, -stride:])
            blocks = xp.reshape(xp.shape[0], -1, stride * xp.shape[2])  # (B, n + 1, stride * Cin)
            windows = torch.cat([blocks[:, :-1], blocks[:, 1:]], dim=2)  # (B, n, kernel * Cin)
            x = windows @ self.conv_w[i] + self.conv_b[i]
            if self.norm:  # ChannelNorm over the last axis is exactly layer norm: one ONNX node
                x = nn.functional.layer_norm(x, x.shape[-1:], self.norm_w[i], self.norm_b[i], self.eps)
            x = torch.relu(x)
        return x, new_caches  # x: (B, F, C)

    def _gru_unrolled(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """torch.nn.GRU's equations, frame by frame: z (B, F, C), h (B, H) -> c (B, F, H), last h."""
        gi = z @ self.gru_w_ih + self.gru.bias_ih_l0  # (B, F, 3H): input parts of the r, u, n gates
        outs = []
        for i in range(self.frames):
            gh = h @ self.gru_w_hh + self.gru.bias_hh_l0
            xr, xu, xn = gi[:, i].chunk(3, dim=-1)
            hr, hu, hn = gh.chunk(3, dim=-1)
            r, u = torch.sigmoid(xr + hr), torch.sigmoid(xu + hu)
            n = torch.tanh(xn + r * hn)
            h = n + u * (h - n)  # (1 - u) n + u h
            outs.append(h)
        return torch.stack(outs, dim=1), h

    def _space(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cosine:
            return x
        return x / torch.clamp(torch.sqrt((x * x).sum(-1, keepdim=True)), min=1e-12)

    def forward(self, audio: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """audio (B, F*160) float32 and the state in STATE_NAMES order ->
        z (B, F, C), c (B, F, H), scores (B, F, K), logprob (B, F, K), valid (B, F, K) bool, new state."""
        caches, gru_h, pred_hist, z_hist, frame_index = (
            list(state[:5]),
            state[5],
            state[6],
            state[7],
            state[8],
        )
        f, k, w, dev = self.frames, self.k, self.window, audio.device
        z, new_caches = self._encode(audio, caches)
        if self.gru_as_matmuls:
            c, h = self._gru_unrolled(z, gru_h)
        else:
            c, h = self.gru(z, gru_h.unsqueeze(0))
            h = h.squeeze(0)

        # All K predictions of the new frames in one product; history holds those of the K frames before.
        p_new = self._space((c @ self.pred_w).unflatten(-1, (k, -1)))  # (B, F, K, C)
        p_all = torch.cat([pred_hist, p_new], dim=1)  # (B, K + F, K, C): row r made at frame t0 - K + r
        ps = p_all.flatten(1, 2).index_select(1, self.aim).unflatten(1, (f, k))  # (B, F, K, C)
        zs = self._space(z)
        pos = (ps * zs.unsqueeze(2)).sum(-1) * self.scale  # (B, F, K)

        # Scores against every frame of [history, new z] at once; frame i keeps the band of columns
        # i .. i + W: its W predecessors and itself (the positive), minus columns before the stream began.
        z_all = torch.cat([z_hist, zs], dim=1)  # (B, W + F, C)
        all_scores = (ps.flatten(1, 2) @ z_all.transpose(1, 2)).unflatten(
            1, (f, k)
        ) * self.scale  # (B,F,K,W+F)
        t = frame_index.unsqueeze(1) + torch.arange(
            f, dtype=torch.int64, device=dev
        )  # (B, F) global frame index
        col = torch.arange(w + f, dtype=torch.int64, device=dev)
        row = col[:f].unsqueeze(1)  # new frame i
        in_band = (col >= row) & (col <= row + w)  # (F, W+F)
        started = (frame_index.unsqueeze(1) - w + col) >= 0  # (B, W + F)
        keep = in_band.unsqueeze(0) & started.unsqueeze(1)  # (B, F, W + F)
        masked = torch.where(keep.unsqueeze(2), all_scores, torch.full_like(all_scores, float("-inf")))
        top = masked.max(dim=-1, keepdim=True).values  # finite: the positive's column is always kept
        logprob = pos - (top.squeeze(-1) + torch.log(torch.exp(masked - top).sum(-1)))
        valid = (t.unsqueeze(2) - torch.arange(1, k + 1, dtype=torch.int64, device=dev)) >= 0  # (B, F, K)
        nan = torch.full_like(pos, float("nan"))
        return (
            z, c, torch.where(valid, pos, nan), torch.where(valid, logprob, nan), valid,
            *new_caches, h, p_all[:, f:], z_all[:, f:], frame_index + f,
        )  # fmt: skip
