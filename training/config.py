"""Configuration: one small object, loaded from config.yaml and overridden by `section.key=value` arguments.

Every key is declared here with its type and default; an unknown key or a value of the wrong type or
outside its allowed set is a one-line UserError that names it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cpc_stream.errors import UserError

# Architecture constants of the paper's encoder (section 3.1). They are not configuration: the streaming
# export, the conv caches and the 160-sample hop all rest on them.
KERNELS = (10, 8, 4, 4, 4)
STRIDES = (5, 4, 2, 2, 2)
HOP = 160  # product of STRIDES: samples per frame
SAMPLE_RATE = 16000


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


CHOICES = {
    "model.norm": ("none", "channel"),
    "model.score": ("cosine", "dot", "dot_scaled"),
    "data.batching": ("mixed", "same_speaker"),
    "negatives.source": ("batch", "batch_excl_current", "current_sequence"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.amp": ("bf16", "none"),
}
POSITIVE = {
    "model.enc_dim", "model.ctx_dim", "model.n_steps", "model.temperature", "data.window",
    "data.batch_size", "negatives.count", "train.max_steps", "train.lr", "train.grad_accum",
    "train.log_every", "train.ckpt_every",
}  # fmt: skip


def _coerce(key: str, value: object, typ: type) -> object:
    """Check one value against its declared type (ints are accepted for floats)."""
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"config key {key}: expected {typ.__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"config key {key}: {value!r} is not one of {', '.join(CHOICES[key])}")
    if key in POSITIVE and value <= 0:
        raise UserError(f"config key {key}: must be > 0, got {value!r}")
    if key.endswith((".workers", ".threads", ".warmup_steps", ".grad_clip", ".weight_decay")) and value < 0:
        raise UserError(f"config key {key}: must be >= 0, got {value!r}")
    return value


def _field_types(section: object) -> dict[str, type]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def set_key(cfg: Config, key: str, value: object) -> None:
    """Set `section.name` on cfg after checking that the key exists and the value fits."""
    section_name, _, name = key.partition(".")
    section = getattr(cfg, section_name, None) if section_name in _field_types(cfg) else None
    if section is None or not name:
        raise UserError(f"unknown config key {key!r} (sections: {', '.join(_field_types(cfg))})")
    types_ = _field_types(section)
    if name not in types_:
        raise UserError(f"unknown config key {key!r} (known in {section_name}: {', '.join(types_)})")
    setattr(section, name, _coerce(key, value, types_[name]))


def from_dict(d: dict) -> Config:
    """Build a Config from a nested dict (a YAML file or a checkpoint's saved config)."""
    cfg = Config()
    if not isinstance(d, dict):
        raise UserError("config must be a mapping of sections (model, data, negatives, train)")
    for section, values in d.items():
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must be a mapping, got {values!r}")
        for name, value in values.items():
            set_key(cfg, f"{section}.{name}", value)
    return cfg


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when path is None) and apply `key=value` overrides."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} not found")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    cfg = from_dict(d)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise UserError(f"override {item!r}: expected section.key=value")
        set_key(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return cfg
