"""CPC_audio's models (facebookresearch/CPC_audio, MIT License), read from its own checkpoints and run as
CPC_audio runs them: the offline reference of an imported model. cpc-export streams it and proves the
graph against it; cpc-features and cpc-eval run it as they run a model of ours.

    model = load_cpc_audio(saved, path)       # saved: what torch.load read from the checkpoint `path`
    z, c = model(wav)                         # CPC_audio's CPCModel.forward: wav (batch, samples) ->
                                              # z (batch, T, enc_dim), c (batch, T, ctx_dim)

Its two checkpoint formats (DESIGN.md section 6):
- released models: {"config": vars(args), "weights": CPCModel.state_dict()}, as hubconf.py loads them;
  the Libri-light 60k model (60k_epoch4-d0f474de.pt) is one. They hold no criterion, so no predictors.
- training checkpoints: checkpoint_N.pt = {"gEncoder": CPCModel.state_dict(), "cpcCriterion", "optimizer",
  "best"}, with checkpoint_args.json (vars(args)) in the same folder, as cpc/feature_loader.py loads them.
Either way the configuration is CPC_audio's defaults (DEFAULTS, cpc/cpc_default_config.py) updated with
the saved arguments, as CPC_audio does (loadArgs).

Supported, and refused otherwise with one line naming the key and its value: encoder_type cpc; normMode
layerNorm (ChannelNorm: per frame over the channels, unbiased variance), batchNorm (at inference an affine
of its running statistics) or ID; arMode GRU or LSTM with nLevelsGRU layers; cpc_mode None, or "none" (no
criterion); one model (`load` naming several checkpoints concatenates models). The k-step predictors
become the graph's scores when they are linear (rnnMode linear, no speaker embedding, a CPC criterion in
the checkpoint), with CPC_audio's score z . W_k c / enc_dim (our "dot_scaled"); otherwise (the default
rnnMode is transformer; released checkpoints hold no criterion) the model has no scores: n_steps 0.

Look-ahead. CPC_audio pads every conv on both sides (PADS: 3, 2, 1, 1, 1), so frame t depends on samples
160 t - 153 .. 160 t + 311: LOOKAHEAD = 152 samples (9.5 ms) after its own hop. The streaming graph emits
frame t one hop late, exactly. The last frame of an utterance reads each layer's zero padding on the right
instead of audio: it is never streamed (docs/onnx-contract.md, "Look-ahead").
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cpc_stream.errors import UserError

from .config import HOP, KERNELS, STRIDES, lookahead

PADS = (3, 2, 1, 1, 1)  # zeros on each side of each conv's input (cpc/model.py, CPCEncoder)
LOOKAHEAD = lookahead(PADS)  # 152 samples
# CPC_audio's defaults for the arguments read here (cpc/cpc_default_config.py; a test checks them there).
DEFAULTS = {
    "hiddenEncoder": 256, "hiddenGar": 256, "nPredicts": 12, "normMode": "layerNorm", "arMode": "LSTM",
    "nLevelsGRU": 1, "rnnMode": "transformer", "cpc_mode": None, "encoder_type": "cpc", "speakerEmbedding": 0,
}  # fmt: skip
NORMS = {"layerNorm": "channel", "batchNorm": "batch", "ID": "none"}  # CPC_audio's normMode -> ours
LINEAR_PREDICTORS = (None, "linear", "none")  # rnnMode values that make PredictionNetwork use nn.Linear
RELEASED_KEYS = {"config", "weights"}
TRAINING_KEYS = {"gEncoder", "cpcCriterion"}
ARGS_FILE = "checkpoint_args.json"  # beside a training checkpoint


@dataclass(frozen=True)
class CPCAudioConfig:
    """An imported model's architecture (CPC_audio's argument in each comment)."""

    enc_dim: int  # hiddenEncoder: conv channels, size of z_t
    ctx_dim: int  # hiddenGar: size of c_t
    norm: str  # normMode, in our words: "channel" (layerNorm), "batch" (batchNorm) or "none" (ID)
    ar: str  # arMode, lower case: "gru" or "lstm"
    ar_layers: int  # nLevelsGRU
    n_steps: int  # nPredicts when the predictors are linear and in the checkpoint; 0: no scores
    temperature = 0.0  # (not a field) the metadata's; CPC_audio's score has none

    @property
    def score(self) -> str:
        return "dot_scaled" if self.n_steps else "none"

    def model_hash(self) -> str:
        """Short hash of the architecture: what an exported graph records as its config_hash."""
        blob = json.dumps({"CPC_audio": asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def describe(self) -> str:
        scores = f"{self.n_steps} linear predictors" if self.n_steps else "no linear predictors: c and z only"
        layers = f"{self.ar_layers} layer{'s' if self.ar_layers > 1 else ''}"
        return f"{self.ar.upper()} ({layers}), norm {self.norm}, dims {self.enc_dim}/{self.ctx_dim}, {scores}"


class ChannelNorm(nn.Module):
    """CPC_audio's ChannelNorm: each frame normalised over its channels with the unbiased variance
    (divided by C - 1), eps 1e-5, then a per-channel affine. (batch, C, frames) in and out."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    def as_layer_norm(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The same function with the biased variance (ONNX LayerNormalization's): since the unbiased
        variance is C / (C - 1) times the biased one, (x - m) / sqrt(var_u + eps) =
        sqrt((C - 1) / C) (x - m) / sqrt(var_b + eps (C - 1) / C). Returns (weight (C,), bias (C,), eps)."""
        c = self.weight.numel()
        shrink = (c - 1) / c
        return self.weight.flatten() * math.sqrt(shrink), self.bias.flatten(), self.eps * shrink


class Encoder(nn.Module):
    """CPC_audio's CPCEncoder: five Conv1d layers padded on both sides, each followed by its norm and ReLU."""

    left_pads = PADS

    def __init__(self, dim: int, norm: str):
        super().__init__()
        chans = [1] + [dim] * len(KERNELS)
        self.convs = nn.ModuleList(
            nn.Conv1d(chans[i], dim, KERNELS[i], STRIDES[i], padding=PADS[i]) for i in range(len(KERNELS))
        )
        make = {"channel": ChannelNorm, "batch": nn.BatchNorm1d, "none": lambda _: nn.Identity()}[norm]
        self.norms = nn.ModuleList(make(dim) for _ in KERNELS)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav (batch, samples) -> z (batch, frames, dim): every sample, as CPC_audio runs it."""
        x = wav[:, None, :]
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = torch.relu(norm(conv(x)))
        return x.transpose(1, 2)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor, tuple | None]]:
        """The encoder as the streaming step computes it, per layer: conv weight (out, in, kernel), bias
        (out,), and the norm after it as ONNX LayerNormalization's (weight, bias, eps) or None. batchNorm
        is an affine at inference, folded into the conv: w * g / sqrt(var + eps), (b - mean) g / sqrt(var
        + eps) + beta."""
        out = []
        for conv, norm in zip(self.convs, self.norms, strict=True):
            w, b = conv.weight, conv.bias
            if isinstance(norm, nn.BatchNorm1d):
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                w, b = w * scale[:, None, None], (b - norm.running_mean) * scale + norm.bias
            out.append((w, b, norm.as_layer_norm() if isinstance(norm, ChannelNorm) else None))
        return out

    def chunk(
        self, wav: torch.Tensor, context: tuple[torch.Tensor, int] | None, last: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int]]:
        """The encoder on one piece of a longer audio (cpc-features): wav (batch, samples), whole hops ->
        z (batch, n, dim) of the frames whose samples have all arrived (frame t: up to 160 t + 311), and
        the context for the next piece: (the samples from one hop before the next frame on, frames
        returned so far). last=True: the audio ends here; the remaining frames come out, computed on
        CPC_audio's right padding as offline. Pieces give exactly the frames of the whole audio: each run
        starts at a hop boundary one hop before its first new frame, whose own left context (153 samples)
        then lies inside the run."""
        kept, done = context if context is not None else (wav[:, :0], 0)
        x = torch.cat([kept, wav], dim=1)
        first = max(done - 1, 0)  # the frame of x's first hop
        if x.shape[1] < HOP:
            return x.new_zeros(x.shape[0], 0, self.convs[0].out_channels), (x, done)
        z = self(x)
        heard = first * HOP + x.shape[1]  # samples of the audio so far
        end = first + z.shape[1] if last else max(done, (heard - HOP - LOOKAHEAD) // HOP + 1)
        keep = (max(end - 1, 0) - first) * HOP
        return z[:, done - first : end - first], (x[:, keep:], end)


class CPCAudio(nn.Module):
    """CPC_audio's CPCModel (its encoder and AR network) with, when they are linear, the K k-step
    predictors of its criterion stacked as ours are (output k - 1 of the reshaped product is W_k c)."""

    lookahead = LOOKAHEAD

    def __init__(self, cfg: CPCAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.enc_dim, cfg.norm)
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cfg.ar]
        self.ar = rnn(cfg.enc_dim, cfg.ctx_dim, num_layers=cfg.ar_layers, batch_first=True)
        self.predictor = (
            nn.Linear(cfg.ctx_dim, cfg.n_steps * cfg.enc_dim, bias=False) if cfg.n_steps else None
        )

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav (batch, samples) -> z (batch, frames, enc_dim), c (batch, frames, ctx_dim)."""
        z = self.encoder(wav)
        c, _ = self.ar(z)
        return z, c

    def predict(self, c: torch.Tensor) -> torch.Tensor:
        """c (..., ctx_dim) -> W_k c for every k: (..., K, enc_dim)."""
        return self.predictor(c).unflatten(-1, (self.cfg.n_steps, self.cfg.enc_dim))

    def score_space(self, x: torch.Tensor) -> torch.Tensor:
        return x  # CPC_audio scores with a plain dot product

    @property
    def score_scale(self) -> float:
        return 1.0 / self.cfg.enc_dim  # (W_k c * z).mean(-1) in cpc/criterion/criterion.py


def is_cpc_audio(saved: object) -> bool:
    """Whether what torch.load read is a CPC_audio checkpoint, in either format."""
    return isinstance(saved, dict) and (RELEASED_KEYS <= saved.keys() or TRAINING_KEYS <= saved.keys())


def _arguments(saved: dict, path: Path) -> tuple[dict, dict, dict | None, str]:
    """(the arguments over DEFAULTS, the CPCModel state dict, the criterion's state dict or None, which
    format) of a checkpoint in either format."""
    if RELEASED_KEYS <= saved.keys():
        args, weights, criterion, kind = saved["config"], saved["weights"], None, "released"
    else:
        args_file = path.parent / ARGS_FILE
        try:
            args = json.loads(args_file.read_text())
        except FileNotFoundError:
            raise UserError(
                f"{path} is a CPC_audio training checkpoint but {args_file} (its arguments) is missing"
            ) from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{args_file}: not readable JSON ({e})") from None
        weights, criterion, kind = saved["gEncoder"], saved["cpcCriterion"], "training"
    if not isinstance(args, dict):
        raise UserError(f"{path}: CPC_audio's arguments are a {type(args).__name__}, expected a mapping")
    if not isinstance(weights, dict) or (criterion is not None and not isinstance(criterion, dict)):
        raise UserError(f"{path}: CPC_audio checkpoint without a state dict of its model")
    return {**DEFAULTS, **args}, weights, criterion, kind


def architecture(args: dict, criterion: dict | None, source: str) -> CPCAudioConfig:
    """The architecture CPC_audio's arguments describe; a UserError naming the key and value of anything
    this importer does not stream."""

    def refuse(key: str, why: str) -> UserError:
        return UserError(f"{source}: CPC_audio {key}={args.get(key)!r} {why}")

    for key in ("hiddenEncoder", "hiddenGar", "nPredicts", "nLevelsGRU"):
        if isinstance(args[key], bool) or not isinstance(args[key], int) or args[key] < 1:
            raise refuse(key, "is not a positive integer")
    if args["encoder_type"] != "cpc":
        raise refuse("encoder_type", "is not supported (only the cpc conv encoder is imported)")
    if args["normMode"] not in NORMS:
        raise refuse("normMode", f"is not supported (expected one of {', '.join(NORMS)})")
    if args["arMode"] not in ("GRU", "LSTM"):
        raise refuse("arMode", "is not supported (expected GRU or LSTM: a recurrent context network streams)")
    if args["cpc_mode"] not in (None, "none"):
        raise refuse("cpc_mode", "is not supported (its context runs backwards or sees the future)")
    load = args.get("load")
    if isinstance(load, list) and len(load) > 1:
        raise refuse("load", "concatenates several models, which is not supported")
    linear = (
        args["rnnMode"] in LINEAR_PREDICTORS
        and not args["speakerEmbedding"]
        and args["cpc_mode"] is None
        and not args.get("supervised", False)
        and criterion is not None
    )
    return CPCAudioConfig(
        enc_dim=args["hiddenEncoder"], ctx_dim=args["hiddenGar"], norm=NORMS[args["normMode"]],
        ar=args["arMode"].lower(), ar_layers=args["nLevelsGRU"], n_steps=args["nPredicts"] if linear else 0,
    )  # fmt: skip


def _our_names(weights: dict) -> dict:
    """CPCModel's state dict keys -> CPCAudio's: gEncoder.conv{i} -> encoder.convs.{i}, gEncoder.batchNorm{i}
    -> encoder.norms.{i}, gAR.baseNet -> ar."""
    out = {}
    for key, value in weights.items():
        name = key.replace("gAR.baseNet.", "ar.", 1)
        for i in range(len(KERNELS)):
            name = name.replace(f"gEncoder.conv{i}.", f"encoder.convs.{i}.", 1)
            name = name.replace(f"gEncoder.batchNorm{i}.", f"encoder.norms.{i}.", 1)
        out[name] = value
    return out


def load_cpc_audio(saved: dict, path: str | Path) -> CPCAudio:
    """The model of a CPC_audio checkpoint (what torch.load read from `path`), in eval mode on the CPU.
    A configuration it does not stream, or weights that do not fit it, is a one-line UserError."""
    path = Path(path)
    args, weights, criterion, kind = _arguments(saved, path)
    cfg = architecture(args, criterion, str(path))
    model = CPCAudio(cfg)
    state = _our_names(weights)
    if cfg.n_steps:
        names = [f"wPrediction.predictors.{k}.weight" for k in range(cfg.n_steps)]
        missing = [n for n in names if n not in criterion]
        if missing:
            raise UserError(f"{path}: its linear predictors lack {missing[0]} (nPredicts={cfg.n_steps})")
        state["predictor.weight"] = torch.cat([criterion[n] for n in names])  # (K * enc_dim, ctx_dim)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(
            f"{path}: the weights of this CPC_audio {kind} checkpoint do not fit its config "
            f"({cfg.describe()}): {' '.join(str(e).split())[:300]}"
        ) from None
    return model.eval()
