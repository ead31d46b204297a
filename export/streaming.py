"""The CPC model as a streaming step with explicit state: what cpc-export turns into ONNX.

One call consumes F hops (F * 160 samples) for B independent streams and returns, per hop, z_t, c_t and
the k-step prediction scores, plus the new state. A zero state is the start of a stream; resetting a
stream is zeroing its rows. Run hop after hop, it reproduces CPC.forward and prediction_scores on the
whole utterance (to float rounding).

State (batch first; C = enc_dim, H = ctx_dim, K = n_steps, W = negatives window):
    cache_conv1..5 (B, 1, C)    each conv layer's carry: its last input block's part of the next output
    gru_h        (B, H)         GRU hidden state
    pred_history (B, K, K, C)   ring: slot s mod K holds W_1..W_K c_s of frame s, for s = t-K .. t-1
    z_history    (B, W, C)      ring: slot s mod W holds z_s, for s = t-W .. t-1
    frame_index  (B,) int64     frames this stream has produced so far
"In score space" means unit-normalised when the score is cosine, unchanged otherwise, so that no stored
vector is normalised twice. The history is kept as predictions rather than contexts so that each call
multiplies only its own new c_t by the predictor matrix. Both histories are rings indexed by frame number
(t = frame_index): a call writes only its F new slots instead of shifting the whole window, which at F=1
would copy it twice per call.

Layout: channels last, and no im2col. Every kernel is twice its stride, so a layer's input folds into
blocks of `stride` time steps (a free reshape) and output j is block j @ W_early + block j+1 @ W_late,
W_early and W_late being the two halves of the kernel. Each call multiplies its own new blocks by both
halves (reading each weight once) and keeps only the last block's W_early part, the carry, for the first
output of the next call. Nothing is concatenated or copied in front of the products.
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
    shapes: dict[str, list[int | str]] = {f"cache_conv{i + 1}": ["B", 1, c] for i in range(len(STRIDES))}
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
        # Conv1d weight (out, in, kernel) -> (kernel * in, out), time-major like the blocks. Its first half
        # acts on the earlier block of a window, its second on the later; side by side, (stride * in,
        # 2 * out), one product gives both parts of every block. The bias goes with the later part, so
        # each output gets it once.
        pairs, biases = [], []
        for conv in model.encoder.convs:
            w = conv.weight.detach().permute(2, 1, 0).reshape(-1, conv.out_channels)
            pairs.append(nn.Parameter(torch.cat([w[: w.shape[0] // 2], w[w.shape[0] // 2 :]], dim=1)))
            biases.append(nn.Parameter(torch.cat([torch.zeros_like(conv.bias), conv.bias.detach()])))
        self.conv_w, self.conv_b = nn.ParameterList(pairs), nn.ParameterList(biases)
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
        # valid[i, j - 1] = (t + i - j >= 0): no context j frames back before the stream began
        i, j = torch.arange(frames_per_call).unsqueeze(1), torch.arange(1, cfg.n_steps + 1)
        self.register_buffer("frame_minus_step", (i - j).unsqueeze(0), persistent=False)  # (1, F, K)

    def _encode(
        self, audio: torch.Tensor, carries: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """audio (B, F*160), each layer's carry (B, 1, C) -> z (B, F, C) and the new carries."""
        x = audio.unsqueeze(-1)  # (B, F*160, 1)
        new_carries = []
        for i, stride in enumerate(STRIDES):
            blocks = x.reshape(x.shape[0], -1, stride * x.shape[2])  # (B, n, stride * Cin): n outputs
            # block j's part of output j (early) and of output j - 1 (late)
            early, late = (blocks @ self.conv_w[i] + self.conv_b[i]).chunk(2, dim=-1)
            if blocks.shape[1] == 1:
                x = carries[i] + late
            else:  # output 0's earlier block is the previous call's last: its part is the carry
                x = torch.cat([carries[i], early[:, :-1]], dim=1) + late
            new_carries.append(early if blocks.shape[1] == 1 else early[:, -1:])
            if self.norm:  # ChannelNorm over the last axis is exactly layer norm: one ONNX node
                x = nn.functional.layer_norm(x, x.shape[-1:], self.norm_w[i], self.norm_b[i], self.eps)
            x = torch.relu(x)
        return x, new_carries  # x: (B, F, C)

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
        return x / torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=1e-12)

    def _aimed_predictions(
        self, pred_ring: torch.Tensor, p_new: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The prediction aimed at new frame i by step j (1..K), made at frame t + i - j by W_j:
        from the ring (slot (t + i - j) mod K) when that frame came before this call, else from this
        call's own p_new. pred_ring (B, K, K, C), p_new (B, F, K, C), t (B,) -> (B, F*K, C)."""
        f, k = self.frames, self.k
        i = torch.arange(f, device=t.device).repeat_interleave(k)  # (F*K,) new frame of each row
        j = torch.arange(1, k + 1, device=t.device).repeat(f)  # (F*K,) its step
        slot = torch.remainder(t.unsqueeze(1) + (i - j), k)  # (B, F*K)
        flat = (slot * k + (j - 1)).unsqueeze(-1).expand(-1, -1, pred_ring.shape[-1])
        ps = torch.gather(pred_ring.flatten(1, 2), 1, flat)
        if f > 1:  # rows with j <= i were predicted within this call
            from_new = (j <= i).unsqueeze(-1)  # (F*K, 1)
            within = [max(a - b, 0) * k + b - 1 for a in range(f) for b in range(1, k + 1)]
            ps = torch.where(from_new, p_new.flatten(1, 2)[:, within], ps)
        return ps

    def _ring_write(self, ring: torch.Tensor, new: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ring (B, N, ...) holding frame s in slot s mod N; write new (B, F, ...) for frames t..t+F-1
        (only the last N of them when F > N) and return the new ring."""
        n, f = ring.shape[1], new.shape[1]
        first = max(0, f - n)
        slots = torch.remainder(t.unsqueeze(1) + torch.arange(first, f, device=t.device), n)  # (B, F')
        rows = torch.arange(ring.shape[0], device=t.device).unsqueeze(1).expand_as(slots)
        return torch.index_put(ring, (rows, slots), new[:, first:])

    def forward(self, audio: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """audio (B, F*160) float32 and the state in STATE_NAMES order ->
        z (B, F, C), c (B, F, H), scores (B, F, K), logprob (B, F, K), valid (B, F, K) bool, new state."""
        caches, gru_h, pred_ring, z_ring, t = list(state[:5]), state[5], state[6], state[7], state[8]
        f, k, w, dev = self.frames, self.k, self.window, audio.device
        z, new_caches = self._encode(audio, caches)
        if self.gru_as_matmuls:
            c, h = self._gru_unrolled(z, gru_h)
        else:
            c, h = self.gru(z, gru_h.unsqueeze(0))
            h = h.squeeze(0)

        # All K predictions of the new frames in one product; those of earlier frames are in the ring.
        p_new = self._space((c @ self.pred_w).unflatten(-1, (k, -1)))  # (B, F, K, C)
        ps = self._aimed_predictions(pred_ring, p_new, t)  # (B, F*K, C)
        zs = self._space(z)  # (B, F, C)

        # Scores of every aimed prediction against the ring's W earlier frames and this call's F frames.
        s_old = (ps @ z_ring.transpose(1, 2)).unflatten(1, (f, k)) * self.scale  # (B, F, K, W)
        s_new = (ps @ zs.transpose(1, 2)).unflatten(1, (f, k)) * self.scale  # (B, F, K, F)
        if f == 1:
            pos = s_new[..., 0]
        else:  # frame i's positive is its own column i
            pos = (s_new * torch.eye(f, device=dev).unsqueeze(1)).sum(-1)
        # Ring slot m holds the frame `age` frames before t; new frame i keeps ages <= W - i (its window)
        # that are also <= t (on or after the stream's start). Of the new frames it keeps 0..i.
        age = w - torch.remainder(torch.arange(w, device=dev) - t.unsqueeze(1), w)  # (B, W) in 1..W
        limit = torch.minimum(t.unsqueeze(1), w - torch.arange(f, device=dev))  # (B, F)
        keep_old = age.unsqueeze(1) <= limit.unsqueeze(2)  # (B, F, W)
        s_old = torch.where(keep_old.unsqueeze(2), s_old, float("-inf"))
        if f > 1:
            i, j = torch.arange(f, device=dev).unsqueeze(1), torch.arange(f, device=dev)
            outside = (j > i) | (i - j > w)  # (F, F): new frame j is not in new frame i's window
            s_new = s_new.masked_fill(outside.unsqueeze(1), float("-inf"))
        logprob = pos - torch.logsumexp(torch.cat([s_old, s_new], dim=-1), dim=-1)
        valid = (t.view(-1, 1, 1) + self.frame_minus_step) >= 0  # (B, F, K)
        nan = float("nan")
        return (
            z, c, torch.where(valid, pos, nan), torch.where(valid, logprob, nan), valid,
            *new_caches, h, self._ring_write(pred_ring, p_new, t), self._ring_write(z_ring, zs, t), t + f,
        )  # fmt: skip
