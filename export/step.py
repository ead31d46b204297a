"""A CPC model as a streaming step with explicit state: what cpc-export turns into ONNX.

One call consumes F hops (F * 160 samples) for B independent streams and returns, per hop, z_t, c_t and
(for a model with linear k-step predictors) the prediction scores, plus the new state. A zero state is
the start of a stream; resetting a stream is zeroing its rows. Run hop after hop, it reproduces the
model's offline output on the whole utterance (to float rounding): our causal CPC (training/model.py:
CPC.forward and prediction_scores) and CPC_audio's models (training/cpc_audio.py).

State (batch first; C = enc_dim, H = ctx_dim, K = n_steps, W = negatives window; cpc_stream/contract.py
owns the layout):
    cache_conv1    (B, 5)       the last 5 audio samples (conv1: kernel 10, stride 5); 13 with look-ahead
    cache_conv2..5 (B, 1, C)    each later conv layer's carry: its last input block's part of the next output
    gru_h          (B, H)       GRU hidden state; an LSTM has lstm_h and lstm_c, and a second layer
                                gru_h2 (lstm_h2, lstm_c2), and so on
    pred_history   (B, K+F, K, C) ring: slot s mod (K+F) holds the K predictions W_1 c_s .. W_K c_s
                                (in score space), for s = t-K-F .. t-1 (models with scores only)
    z_history      (B, W+F, C)  ring: slot s mod (W+F) holds z_s (in score space), for s = t-W-F .. t-1
                                (models with scores only)
    frame_index    (B,) int64   hops this stream has consumed so far (t)
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

Look-ahead (CPC_audio's convs pad both sides: frame t depends on samples up to 160 (t + 1) + 151). Each
call computes, in every layer, exactly the outputs that its newest frame needs, which is the newest frame
whose samples have all arrived: frame t + F - 1 - delay (delay = 1). The block structure above holds
unchanged (a layer's new inputs still start where a block of its next output starts); conv1's cache
grows by the samples that the newest frame does not need yet (8). A stream's first call also computes,
in each layer, outputs before index 0: they are set to 0, the zero padding CPC_audio puts there, and the
context network does not run on the frames before 0 (its state stays zero), so the runtime only has to
drop those frames (contract.ModelInfo.delay).
"""

from __future__ import annotations

import math

import torch
from cpc_training.config import HOP, KERNELS, STRIDES
from torch import nn

from cpc_stream.contract import OUTPUT_NAMES, StateTensor, ar_state_names, delay_frames, state_layout


def ar_kind(model: nn.Module) -> str:
    """The context network's cell: "gru" or "lstm" (model.ar is a torch nn.GRU or nn.LSTM)."""
    return "lstm" if isinstance(model.ar, nn.LSTM) else "gru"


def conv1_cache(model: nn.Module) -> int:
    """Samples conv1 keeps from call to call: its kernel minus its stride, plus the samples of each call
    that a look-ahead model's newest frame does not need yet (delay hops minus the look-ahead)."""
    return KERNELS[0] - STRIDES[0] + delay_frames(model.lookahead) * HOP - model.lookahead


def layout(model: nn.Module, window: int, frames: int) -> tuple[StateTensor, ...]:
    """The contract's state layout (cpc_stream/contract.py) for this model, F = `frames` hops per call and
    a negatives window of `window` frames (unused without scores)."""
    c = model.cfg
    k = c.n_steps if model.predictor is not None else 0
    return state_layout(
        c.enc_dim,
        c.ctx_dim,
        k,
        frames,
        window if k else 0,
        conv1_cache(model),
        ar_kind(model),
        model.ar.num_layers,
    )


def state_shapes(model: nn.Module, window: int, frames: int) -> dict[str, list[int | str]]:
    """State shapes with "B" for the batch axis: the graph's metadata `state_shapes`."""
    return {s.name: list(s.shape) for s in layout(model, window, frames)}


def zero_state(model: nn.Module, window: int, frames: int, batch: int) -> list[torch.Tensor]:
    """The state of `batch` new streams, in input order."""
    return [
        torch.zeros([batch if d == "B" else d for d in s.shape], dtype=getattr(torch, s.dtype))
        for s in layout(model, window, frames)
    ]


class CPCStep(nn.Module):
    """A CPC model run F hops at a time with explicit state (see the module docstring). `model` is our CPC
    or a CPCAudio: what is read from it is its encoder's layers() and left_pads, its lookahead, its
    context network `ar` (torch GRU or LSTM), its predictor (None: no scores) and its score function."""

    def __init__(self, model: nn.Module, frames_per_call: int, window: int, ar_as_matmuls: bool = False):
        super().__init__()
        assert all(k == 2 * s for k, s in zip(KERNELS, STRIDES, strict=True)), (
            "conv folding needs kernel = 2 x stride"
        )
        cfg = model.cfg
        self.frames = frames_per_call
        self.scores = model.predictor is not None
        self.k, self.window = (cfg.n_steps, window) if self.scores else (0, 0)
        self.names = tuple(s.name for s in layout(model, window, frames_per_call))
        self.outputs = OUTPUT_NAMES if self.scores else OUTPUT_NAMES[:2]
        self.delay = delay_frames(model.lookahead)
        layers = [(w.detach(), b.detach(), norm) for w, b, norm in model.encoder.layers()]

        # conv1 sees raw samples: its windows are gathered from the cache and the new audio (an im2col of
        # 160 samples per frame is cheaper than carrying its (32, 2C) output halves).
        w1, b1, _ = layers[0]
        self.conv1_w = nn.Parameter(w1.flatten(1).t().contiguous())  # (10, C)
        self.conv1_b = nn.Parameter(b1.clone())
        self.conv1_cache = conv1_cache(model)
        assert self.conv1_cache <= frames_per_call * HOP
        n1 = frames_per_call * HOP // STRIDES[0]  # conv1 outputs per call
        taps = torch.arange(n1).unsqueeze(1) * STRIDES[0] + torch.arange(KERNELS[0])  # (n1, 10) samples
        self.register_buffer("conv1_index", taps.flatten(), persistent=False)
        # Later convs: weight (out, in, kernel) -> (kernel * in, out), time-major like the blocks. Its
        # first half acts on the earlier block of a window, its second on the later; side by side,
        # (stride * in, 2 * out), one product gives both parts of every block. The bias goes with the
        # later part, so each output gets it once.
        pairs, biases = [], []
        for w, b, _ in layers[1:]:
            w = w.permute(2, 1, 0).reshape(-1, w.shape[0])
            pairs.append(nn.Parameter(torch.cat([w[: w.shape[0] // 2], w[w.shape[0] // 2 :]], dim=1)))
            biases.append(nn.Parameter(torch.cat([torch.zeros_like(b), b])))
        self.conv_w, self.conv_b = nn.ParameterList(pairs), nn.ParameterList(biases)
        self.norm = layers[0][2] is not None  # ChannelNorm after every conv, as ONNX LayerNormalization
        if self.norm:
            self.norm_w = nn.ParameterList(nn.Parameter(n[0].detach().clone()) for _, _, n in layers)
            self.norm_b = nn.ParameterList(nn.Parameter(n[1].detach().clone()) for _, _, n in layers)
            self.eps = [n[2] for _, _, n in layers]

        # Look-ahead: how many outputs of each layer a stream's first call computes before index 0 (they
        # must read as CPC_audio's zero padding). Walk back from the call's newest frame (F - 1 - delay) to
        # the newest input each layer reads (module docstring); none for a causal model.
        newest, self.before_start = frames_per_call - 1 - self.delay, []
        for layer in reversed(range(len(KERNELS))):
            per_call = frames_per_call * HOP // math.prod(STRIDES[: layer + 1])
            self.before_start.insert(0, per_call - 1 - newest)
            newest = STRIDES[layer] * (newest + 2) - model.encoder.left_pads[layer] - 1
        assert newest == frames_per_call * HOP - 1 - (self.conv1_cache - KERNELS[0] + STRIDES[0])
        for layer, count in enumerate(self.before_start[:-1]):
            per_call = n1 // math.prod(STRIDES[1 : layer + 1])
            # output j of a call made after t hops has index t * (per_call / F) + j - count
            self.register_buffer(f"from_start{layer}", torch.arange(per_call) - count, persistent=False)
        self.register_buffer("frame_of_output", torch.arange(frames_per_call) - self.delay, persistent=False)

        # The context network. cpc-train's (one GRU layer, no look-ahead, float weights) is one ONNX GRU
        # node. Every other one is spelt out as its equations, a layer at a time and unrolled over F: an
        # LSTM or several layers (no node to keep), a look-ahead model (a frame before the stream's start
        # must leave the state as it was) and the int8 variant (onnxruntime has no quantised GRU or LSTM:
        # the products must be MatMuls to be quantised).
        self.ar_kind, self.ar_layers = ar_kind(model), model.ar.num_layers
        self.unrolled = ar_as_matmuls or self.delay > 0 or self.ar_kind != "gru" or self.ar_layers > 1
        if self.unrolled:  # weights stored transposed, so that every frame's product reads the same constant
            ar = model.ar
            self.ar_w_ih = nn.ParameterList(
                nn.Parameter(getattr(ar, f"weight_ih_l{i}").detach().t().contiguous())
                for i in range(self.ar_layers)
            )  # (in, G * H): G = 3 gates (GRU: r, u, n) or 4 (LSTM: i, f, g, o)
            self.ar_w_hh = nn.ParameterList(
                nn.Parameter(getattr(ar, f"weight_hh_l{i}").detach().t().contiguous())
                for i in range(self.ar_layers)
            )  # (H, G * H)
            self.ar_b_ih = nn.ParameterList(
                nn.Parameter(getattr(ar, f"bias_ih_l{i}").detach().clone()) for i in range(self.ar_layers)
            )
            self.ar_b_hh = nn.ParameterList(
                nn.Parameter(getattr(ar, f"bias_hh_l{i}").detach().clone()) for i in range(self.ar_layers)
            )
        else:
            self.gru = nn.GRU(cfg.enc_dim, cfg.ctx_dim, batch_first=True)
            self.gru.load_state_dict(model.ar.state_dict())

        if self.scores:
            self.cosine = cfg.score == "cosine"
            self.scale = model.score_scale
            # Cosine scores lie within +-scale: below 40, exp of every score and their sum fit in float32.
            self.bounded = self.cosine and self.scale <= 40
            # Predictor (K*C, H), stored transposed: c (B, F, H) @ pred_w gives every W_k c at once.
            self.pred_w = nn.Parameter(model.predictor.weight.detach().t().contiguous())  # (H, K*C)
            self.register_buffer("steps", torch.arange(cfg.n_steps), persistent=False)
            self.register_buffer("same_frame", torch.eye(frames_per_call).unsqueeze(-1), persistent=False)
            # valid[i, j - 1] = (t + i - j >= 0): no context j frames back before the stream began
            i, j = torch.arange(frames_per_call).unsqueeze(1), torch.arange(1, cfg.n_steps + 1)
            self.register_buffer("frame_minus_step", (i - j).unsqueeze(0), persistent=False)  # (1, F, K)

    def _encode(
        self, audio: torch.Tensor, caches: list[torch.Tensor], t: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """audio (B, F*160), conv1's last samples (B, conv1_cache), each later layer's carry (B, 1, C) and
        the hops consumed so far t (B,) -> z (B, F, C) and the new caches."""
        b = audio.shape[0]
        samples = torch.cat([caches[0], audio], dim=1)  # (B, conv1_cache + F*160)
        windows = torch.index_select(samples, 1, self.conv1_index).reshape(b, -1, KERNELS[0])
        x = self._norm_relu(windows @ self.conv1_w + self.conv1_b, 0, t)  # (B, 32F, C)
        new_caches = [audio[:, audio.shape[1] - self.conv1_cache :]]
        for i, stride in enumerate(STRIDES[1:]):
            blocks = x.reshape(b, -1, stride * x.shape[2])  # (B, n, stride * Cin): n outputs
            # block j's part of output j (early) and of output j - 1 (late)
            early, late = (blocks @ self.conv_w[i] + self.conv_b[i]).chunk(2, dim=-1)
            if blocks.shape[1] == 1:
                x = caches[i + 1] + late
            else:  # output 0's earlier block is the previous call's last: its part is the carry
                x = torch.cat([caches[i + 1], early[:, :-1]], dim=1) + late
            new_caches.append(early if blocks.shape[1] == 1 else early[:, -1:])
            x = self._norm_relu(x, i + 1, t)
        return x, new_caches  # x: (B, F, C)

    def _norm_relu(self, x: torch.Tensor, layer: int, t: torch.Tensor) -> torch.Tensor:
        if self.norm:  # ChannelNorm over the last axis is exactly layer norm: one ONNX node
            x = nn.functional.layer_norm(
                x, x.shape[-1:], self.norm_w[layer], self.norm_b[layer], self.eps[layer]
            )
        x = torch.relu(x)
        if layer < len(KERNELS) - 1 and self.before_start[layer]:  # zero where the next layer sees padding
            index = t.unsqueeze(1) * (x.shape[1] // self.frames) + getattr(
                self, f"from_start{layer}"
            )  # (B, n)
            x = x * (index >= 0).unsqueeze(-1).to(x.dtype)
        return x

    def _ar_unrolled(
        self, x: torch.Tensor, state: list[list[torch.Tensor]], started: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """torch.nn.GRU's or LSTM's equations, layer by layer and frame by frame: x (B, F, C) and each
        layer's state ([h] or [h, c], each (B, H)) -> c (B, F, H) and the new states. started (B, F) bool:
        where False (a frame before the stream's start) the state stays as it was."""
        new_state = []
        weights = zip(self.ar_w_ih, self.ar_w_hh, self.ar_b_ih, self.ar_b_hh, strict=True)
        for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
            gi = x @ w_ih + b_ih  # (B, F, G * H): the input's part of every gate, all frames at once
            h, *cell = state[layer]
            outs = []
            for i in range(self.frames):
                gh = h @ w_hh + b_hh
                if self.ar_kind == "lstm":
                    gate_i, gate_f, gate_g, gate_o = (gi[:, i] + gh).chunk(4, dim=-1)
                    c = torch.sigmoid(gate_f) * cell[0] + torch.sigmoid(gate_i) * torch.tanh(gate_g)
                    new = [torch.sigmoid(gate_o) * torch.tanh(c), c]
                else:
                    xr, xu, xn = gi[:, i].chunk(3, dim=-1)
                    hr, hu, hn = gh.chunk(3, dim=-1)
                    r, u = torch.sigmoid(xr + hr), torch.sigmoid(xu + hu)
                    n = torch.tanh(xn + r * hn)
                    new = [n + u * (h - n)]  # (1 - u) n + u h
                if started is not None:
                    new = [
                        torch.where(started[:, i : i + 1], v, old)
                        for v, old in zip(new, [h, *cell], strict=True)
                    ]
                h, *cell = new
                outs.append(h)
            x = torch.stack(outs, dim=1)
            new_state.append([h, *cell])
        return x, new_state

    def _space(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """x in score space, times `scale`: unit-normalised when the score is cosine."""
        if not self.cosine:
            return x * scale if scale != 1.0 else x
        norm = torch.clamp(torch.linalg.vector_norm(x, dim=-1, keepdim=True), min=1e-12)
        return x / (norm / scale) if scale != 1.0 else x / norm

    def _window_of_ring(self, t: torch.Tensor) -> torch.Tensor:
        """Which slots of the written ring are in each new frame's negatives window: (B, F, N) bool, for
        t (B,) the frame of the call's first output. Slot m holds the frame `back` = (t+F-1-m) mod N
        frames before the call's last; new frame i keeps F-1-i <= back <= F-1-i + W (itself and W frames
        before it) that is also on or after the stream's start (back <= t+F-1)."""
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

    def _scores(
        self, z: torch.Tensor, c: torch.Tensor, pred_ring: torch.Tensor, z_ring: torch.Tensor, t: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """z (B, F, C), c (B, F, H), the rings and t (B,), the frame of the call's first output (frame t+i
        is output i) -> (scores, logprob, valid), each (B, F, K), and the new rings."""
        f, k = self.frames, self.k
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
        return (torch.where(valid, pos, nan), torch.where(valid, logprob, nan), valid), pred_ring, z_ring

    def forward(self, audio: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """audio (B, F*160) float32 and the state in self.names order -> the contract's outputs
        z (B, F, C), c (B, F, H) and, with scores, scores (B, F, K), logprob (B, F, K), valid (B, F, K)
        bool; then the new state in the same order."""
        s = dict(zip(self.names, state, strict=True))
        t = s["frame_index"]
        z, new_caches = self._encode(audio, [s[f"cache_conv{i}"] for i in range(1, 6)], t)
        names = [ar_state_names(self.ar_kind, layer) for layer in range(1, self.ar_layers + 1)]
        if self.unrolled:
            started = (t.unsqueeze(1) + self.frame_of_output) >= 0 if self.delay else None  # (B, F)
            c, ar_state = self._ar_unrolled(z, [[s[n] for n in layer] for layer in names], started)
        else:
            c, h = self.gru(z, s["gru_h"].unsqueeze(0))
            ar_state = [[h.squeeze(0)]]
        new = {f"cache_conv{i}": cache for i, cache in enumerate(new_caches, 1)}
        for layer_names, values in zip(names, ar_state, strict=True):
            new.update(zip(layer_names, values, strict=True))
        new["frame_index"] = t + self.frames
        outputs: tuple[torch.Tensor, ...] = (z, c)
        if self.scores:  # frame of output i: t + i - delay
            scores, new["pred_history"], new["z_history"] = self._scores(
                z, c, s["pred_history"], s["z_history"], t - self.delay
            )
            outputs += scores
        return (*outputs, *(new[name] for name in self.names))
