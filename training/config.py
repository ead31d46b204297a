"""Training configuration: one small object, loaded from config.yaml and overridden by `section.key=value`
arguments (cpc_stream.config_file does the checking: unknown keys and bad values are one-line errors)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cpc_stream import config_file
from cpc_stream.contract import HOP, SAMPLE_RATE  # noqa: F401 (re-exported: training's modules import them here)

# Architecture constants of the paper's encoder (section 3.1). They are not configuration: the streaming
# export and its conv caches rest on them. The audio rate and the hop are the streaming contract's.
KERNELS = (10, 8, 4, 4, 4)
STRIDES = (5, 4, 2, 2, 2)
assert math.prod(STRIDES) == HOP, "the encoder's total stride must be the contract's hop"
CAUSAL_PADS = tuple(
    k - s for k, s in zip(KERNELS, STRIDES, strict=True)
)  # each conv's left padding: 5 4 2 2 2


def lookahead(left_pads: Sequence[int]) -> int:
    """Samples after frame t's own hop that frame t depends on, for the encoder's convs padded on the left
    by `left_pads` zeros each: 0 for CAUSAL_PADS, 152 (9.5 ms) for CPC_audio's 3, 2, 1, 1, 1. Walks from
    frame 0 back through the layers to the newest input each one reads (output j of a conv reads inputs
    stride * j - pad .. stride * j - pad + kernel - 1)."""
    newest = 0
    for k, s, p in reversed(list(zip(KERNELS, STRIDES, left_pads, strict=True))):
        newest = s * newest - p + k - 1
    return newest - (HOP - 1)


@dataclass
class ModelConfig:
    enc_dim: int = 512  # channels of every conv layer, size of z_t
    ctx_dim: int = 256  # GRU units, size of c_t
    n_steps: int = 12  # K: predictors W_1..W_K
    norm: str = "channel"  # per-frame normalisation after each conv: none | channel
    score: str = "cosine"  # cosine (z.Wc over norms / temperature) | dot (paper) | dot_scaled (dot / enc_dim)
    temperature: float = 0.1  # used by score=cosine only


@dataclass
class DataConfig:
    root: str = "data/librispeech-mini"  # LibriSpeech root holding <subset>/<speaker>/<chapter>/*.flac
    subset: str = "train-clean-100"
    train_split: str = ""  # optional file of utterance ids (the CPC paper's train_split.txt)
    window: int = 20480  # samples per training window (128 frames)
    batch_size: int = 8  # windows per step per process
    batching: str = "mixed"  # mixed: windows from any speaker | same_speaker: one speaker per batch
    workers: int = 2  # DataLoader worker processes


@dataclass
class NegativesConfig:
    count: int = 128  # negatives per prediction
    # batch: any frame of the batch | batch_excl_current: any frame of the other sequences |
    # current_sequence: frames of the same sequence only
    source: str = "batch"


@dataclass
class TrainConfig:
    out_dir: str = "runs/cpc"
    max_steps: int = 300000
    lr: float = 2e-4
    warmup_steps: int = 1000  # linear learning-rate warm-up from lr/warmup_steps to lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    grad_accum: int = 1  # micro-batches per optimiser step
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "bf16"  # bf16 | none; bf16 autocast is used on CUDA only
    compile: bool = False  # torch.compile the model
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    log_every: int = 10
    ckpt_every: int = 1000


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_hash(self) -> str:
        """Short hash of the model section: what a checkpoint's weights and an export must agree on."""
        blob = json.dumps(dataclasses.asdict(self.model), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


RULES = config_file.Rules(
    choices={
        "model.norm": ("none", "channel"),
        "model.score": ("cosine", "dot", "dot_scaled"),
        "data.batching": ("mixed", "same_speaker"),
        "negatives.source": ("batch", "batch_excl_current", "current_sequence"),
        "train.device": ("auto", "cpu", "cuda"),
        "train.amp": ("bf16", "none"),
    },
    positive=frozenset({
        "model.enc_dim", "model.ctx_dim", "model.n_steps", "model.temperature", "data.window",
        "data.batch_size", "negatives.count", "train.max_steps", "train.lr", "train.grad_accum",
        "train.log_every", "train.ckpt_every",
    }),
)  # fmt: skip


def from_dict(d: dict) -> Config:
    """Build a Config from a nested dict (a YAML file or a checkpoint's saved config)."""
    return config_file.from_dict(Config, d, RULES)


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply `key=value` overrides."""
    return config_file.load(Config, path, overrides, RULES)
