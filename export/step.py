"""The CPC model as a streaming step with explicit state: what cpc-export turns into ONNX.

One call consumes F hops (F * 160 samples) for B independent streams and returns, per hop, z_t, c_t and
the k-step prediction scores, plus the new state. A zero state is the start of a stream; resetting a
stream is zeroing its rows. Run hop after hop, it reproduces CPC.forward and prediction_scores on the
whole utterance (to float rounding).

State (batch first; C = enc_dim, H = ctx_dim, K = n_steps, W = negatives window):
    cache_conv1    (B, 5)       the last 5 audio samples (conv1: kernel 10, stride 5)
    cache_conv2..5 (B, 1, C)    each later conv layer's carry: its last input block's part of the next output
    gru_h          (B, H)       GRU hidden state
    pred_history   (B, K+F, K, C) ring: slot s mod (K+F) holds the K predictions W_1 c_s .. W_K c_s
                                (in score space), for s = t-K-F .. t-1
    z_history      (B, W+F, C)  ring: slot s mod (W+F) holds z_s (in score space), for s = t-W-F .. t-1
    frame_index    (B,) int64   frames this stream has produced so far (t)
"In score space" means unit-normalised (and, for predictions, scaled by 1/temperature) when the score
is cosine, unchanged otherwise, so that no stored vector is normalised twice.

The rings are indexed by frame number: a call writes its F new slots (one ScatterND each) and reads the
rings where they lie. Each call first writes, then reads the written rings: K + F and W + F slots hold
every new frame's predictions (made from c_{t+i-K} .. c_{t+i-1}) and negatives window (z_{t+i-W} ..
z_{t+i}) once the call's own frames are in. So the write is the only node that reads a ring input, and
a runtime may bind new_pred_history and new_z_history to the input buffers themselves (metadata
inplace_state): onnxruntime then writes the F new slots in place instead of copying both rings (0.58 MB
per stream at F=1) on every call. All K predictions come from one product with the whole predictor.

Layout: conv1 gathers its windows of 10 samples from the cache and the new audio (its input is tiny).
The later convs are channels last with no im2col: every kernel is twice its stride, so a layer's input
folds into blocks of `stride` time steps (a free reshape) and output j is block j @ W_early + block j+1 @
W_late, W_early and W_late being the two halves of the kernel. Each call multiplies its own new blocks by
both halves (reading each weight once) and keeps only the last block's W_early part, the carry, for the
first output of the next call. Nothing is concatenated or copied in front of those products.
"""

from __future__ import annotations

import torch
from cpc_training.config import HOP, KERNELS, STRIDES
from cpc_training.model import CPC
from torch import nn

from cpc_stream.contract import STATE_NAMES, StateTensor, state_layout


def layout(model: CPC, window: int, frames: int) -> tuple[StateTensor, ...]:
    """The contract's state layout (cpc_stream/contract.py) for this model, F = `frames` hops per call and
    a negatives window of `window` frames."""
    c = model.cfg
    return state_layout(c.enc_dim, c.ctx_dim, c.n_steps, frames, window, conv1_cache=KERNELS[0] - STRIDES[0])


def state_shapes(model: CPC, window: int, frames: int) -> dict[str, list[int | str]]:
    """State shapes with "B" for the batch axis: the graph's metadata `state_shapes`."""
    return {s.name: list(s.shape) for s in layout(model, window, frames)}


def zero_state(model: CPC, window: int, frames: int, batch: int) -> list[torch.Tensor]:
    """The state of `batch` new streams, in input order."""
    return [
        torch.zeros([batch if d == "B" else d for d in s.shape], dtype=getattr(torch, s.dtype))
        for s in layout(model, window, frames)
    ]


class CPCStep(nn.Module):
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
        # Cosine scores lie within +-scale: below 40, exp of every score and their sum fit in float32.
        self.bounded = self.cosine and self.scale <= 40
        # conv1 sees raw samples: its windows are gathered from the last 5 samples and the new audio (an
        # im2col of 160 samples per frame is cheaper than carrying its (32, 2C) output halves).
        conv1 = model.encoder.convs[0]
        self.conv1_w = nn.Parameter(conv1.weight.detach().flatten(1).t().contiguous())  # (10, C)
        self.conv1_b = nn.Parameter(conv1.bias.detach().clone())
        n1 = frames_per_call * HOP // STRIDES[0]  # conv1 outputs per call
        taps = torch.arange(n1).unsqueeze(1) * STRIDES[0] + torch.arange(KERNELS[0])  # (n1, 10) samples
        self.register_buffer("conv1_index", taps.flatten(), persistent=False)
        # Later convs: weight (out, in, kernel) -> (kernel * in, out), time-major like the blocks. Its
        # first half acts on the earlier block of a window, its second on the later; side by side,
        # (stride * in, 2 * out), one product gives both parts of every block. The bias goes with the
        # later part, so each output gets it once.
        pairs, biases = [], []
        for conv in model.encoder.convs[1:]:
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
        # Predictor (K*C, H), stored transposed: c (B, F, H) @ pred_w gives every W_k c at once.
        self.pred_w = nn.Parameter(model.predictor.weight.detach().t().contiguous())  # (H, K*C)
        self.register_buffer("steps", torch.arange(cfg.n_steps), persistent=False)
        self.register_buffer("same_frame", torch.eye(frames_per_call).unsqueeze(-1), persistent=False)
        # valid[i, j - 1] = (t + i - j >= 0): no context j frames back before the stream began
        i, j = torch.arange(frames_per_call).unsqueeze(1), torch.arange(1, cfg.n_steps + 1)
        self.register_buffer("frame_minus_step", (i - j).unsqueeze(0), persistent=False)  # (1, F, K)

    def _encode(
        self, audio: torch.Tensor, caches: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """audio (B, F*160), conv1's last samples (B, 5) and each later layer's carry (B, 1, C) ->
        z (B, F, C) and the new caches."""
        b = audio.shape[0]
        samples = torch.cat([caches[0], audio], dim=1)  # (B, 5 + F*160)
        windows = torch.index_select(samples, 1, self.conv1_index).reshape(b, -1, KERNELS[0])
        x = self._norm_relu(windows @ self.conv1_w + self.conv1_b, 0)  # (B, 32F, C)
        new_caches = [audio[:, audio.shape[1] - (KERNELS[0] - STRIDES[0]) :]]
        for i, stride in enumerate(STRIDES[1:]):
            blocks = x.reshape(b, -1, stride * x.shape[2])  # (B, n, stride * Cin): n outputs
            # block j's part of output j (early) and of output j - 1 (late)
            early, late = (blocks @ self.conv_w[i] + self.conv_b[i]).chunk(2, dim=-1)
            if blocks.shape[1] == 1:
                x = caches[i + 1] + late
            else:  # output 0's earlier block is the previous call's last: its part is the carry
                x = torch.cat([caches[i + 1], early[:, :-1]], dim=1) + late
            new_caches.append(early if blocks.shape[1] == 1 else early[:, -1:])
            x = self._norm_relu(x, i + 1)
        return x, new_caches  # x: (B, F, C)

    def _norm_relu(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        if self.norm:  # ChannelNorm over the last axis is exactly layer norm: one ONNX node
            x = nn.functional.layer_norm(x, x.shape[-1:], self.norm_w[layer], self.norm_b[layer], self.eps)
        return torch.relu(x)

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

    def _space(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """x in score space, times `scale`: unit-normalised when the score is cosine."""
        if not self.cosine:
            return x * scale if scale != 1.0 else x
        norm = torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=1e-12)
        return x / (norm / scale) if scale != 1.0 else x / norm

    def _window_of_ring(self, t: torch.Tensor) -> torch.Tensor:
        """Which slots of the written ring are in each new frame's negatives window: (B, F, N) bool, for
        t (B,) frames seen before the call. Slot m holds the frame `back` = (t+F-1-m) mod N frames before
        the call's last; new frame i keeps F-1-i <= back <= F-1-i + W (itself and W frames before it)
        that is also on or after the stream's start (back <= t+F-1)."""
        f, w, dev = self.frames, self.window, t.device
        n = w + f
        slots = torch.arange(n, device=dev)
        if f == 1:  # the ring holds exactly one window: keep the slots written so far, m <= t
            return (slots <= t.unsqueeze(1)).unsqueeze(1)
        back = torch.remainder(t.unsqueeze(1) + (f - 1) - slots, n).unsqueeze(1)  # (B, 1, N)
        lo = torch.arange(f - 1, -1, -1, device=dev).unsqueeze(1)  # (F, 1): F-1-i
        hi = torch.minimum(lo + w, t.view(-1, 1, 1) + (f - 1))  # (B, F, 1)
        return (back >= lo) & (back <= hi)

    def _ring_write(self, ring: torch.Tensor, new: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ring (B, N, ...) holding frame s in slot s mod N (N > F); write new (B, F, ...) for frames
        t..t+F-1 and return the new ring."""
        slots = torch.remainder(t.unsqueeze(1) + torch.arange(new.shape[1], device=t.device), ring.shape[1])
        rows = torch.arange(ring.shape[0], device=t.device).unsqueeze(1).expand_as(slots)
        return torch.index_put(ring, (rows, slots), new)  # (B, F) slots

    def forward(self, audio: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """audio (B, F*160) float32 and the state in STATE_NAMES order -> the contract's outputs
        z (B, F, C), c (B, F, H), scores (B, F, K), logprob (B, F, K), valid (B, F, K) bool, then the new
        state in the same order."""
        s = dict(zip(STATE_NAMES, state, strict=True))
        caches = [s[f"cache_conv{i}"] for i in range(1, 6)]
        gru_h, pred_ring, z_ring, t = s["gru_h"], s["pred_history"], s["z_history"], s["frame_index"]
        f, k = self.frames, self.k
        z, new_caches = self._encode(audio, caches)
        if self.gru_as_matmuls:
            c, h = self._gru_unrolled(z, gru_h)
        else:
            c, h = self.gru(z, gru_h.unsqueeze(0))
            h = h.squeeze(0)

        # This call's contexts make all K predictions each. Both rings are written before they are read
        # (the module docstring says why).
        preds = self._space((c @ self.pred_w).unflatten(-1, (k, -1)), self.scale)  # (B, F, K, C), scaled
        zs = self._space(z)  # (B, F, C)
        pred_ring = self._ring_write(pred_ring, preds, t)  # (B, K + F, K, C)
        z_ring = self._ring_write(z_ring, zs, t)  # (B, W + F, C)
        # Frame t+i's step-j prediction was made from c_{t+i-j}: slot (t+i-j) mod (K+F), row j - 1.
        src = torch.remainder(t.view(-1, 1, 1) + self.frame_minus_step, k + f)  # (B, F, K)
        rows = torch.arange(src.shape[0], device=src.device).view(-1, 1, 1).expand_as(src)
        ps = pred_ring[rows, src, self.steps]  # (B, F, K, C)
        pos = (ps * zs.unsqueeze(2)).sum(-1)  # (B, F, K): z_{t+i} . its step-k prediction
        s_ring = z_ring @ ps.flatten(1, 2).transpose(1, 2)  # (B, W + F, F*K): every slot, every prediction
        keep = self._window_of_ring(t)  # (B, F, W + F)
        if self.bounded:  # no exp can overflow: sum them directly, through the 0/1 window
            total = keep.to(s_ring.dtype) @ torch.exp(s_ring)  # (B, F, F*K): [frame i, frame i', k]
            if f > 1:  # frame i's sum over its own predictions only
                total = (total.unflatten(-1, (f, k)) * self.same_frame).sum(2)
            logprob = pos - torch.log(total)  # (B, F, K)
        else:  # unbounded scores: logsumexp, with the slots outside each window at -inf
            s_ring = s_ring.unflatten(-1, (f, k)).masked_fill(
                ~keep.transpose(1, 2).unsqueeze(-1), float("-inf")
            )  # (B, W + F, F, K)
            logprob = pos - torch.logsumexp(s_ring, dim=1)  # (B, F, K)
        valid = (t.view(-1, 1, 1) + self.frame_minus_step) >= 0  # (B, F, K)
        nan = float("nan")
        new = {f"cache_conv{i}": cache for i, cache in enumerate(new_caches, 1)}
        new.update(gru_h=h, pred_history=pred_ring, z_history=z_ring, frame_index=t + f)
        outputs = (z, c, torch.where(valid, pos, nan), torch.where(valid, logprob, nan), valid)
        return (*outputs, *(new[name] for name in STATE_NAMES))
