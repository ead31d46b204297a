"""Typed configuration from YAML plus `section.key=value` overrides, shared by every command.

A configuration is a dataclass of section dataclasses whose fields declare type and default. One
config.yaml holds the sections of every tool (SECTIONS names them all); each tool checks its own sections
and skips the other tools'. An unknown section, an unknown key, a wrong type, a value outside its allowed
set, a negative or non-finite number is a one-line UserError naming the key, from whichever tool reads
the file.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import yaml

from .errors import UserError

# Every section of config.yaml, and the tool that reads it. A tool that gains a section adds it here.
SECTIONS = {
    "model": "cpc-train", "data": "cpc-train", "negatives": "cpc-train", "train": "cpc-train",
    "stream": "cpc-stream",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Rules:
    choices: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # key -> allowed values
    positive: frozenset[str] = frozenset()  # keys that must be > 0 (all numbers must be >= 0)


def _coerce(key: str, value: object, typ: type, rules: Rules) -> object:
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
    if key in rules.choices and value not in rules.choices[key]:
        raise UserError(f"config key {key}: {value!r} is not one of {', '.join(rules.choices[key])}")
    if typ in (int, float):
        if not math.isfinite(value):
            raise UserError(f"config key {key}: must be a finite number, got {value!r}")
        if key in rules.positive and value <= 0:
            raise UserError(f"config key {key}: must be > 0, got {value!r}")
        if value < 0:
            raise UserError(f"config key {key}: must be >= 0, got {value!r}")
    return value


def _field_types(obj: object) -> dict[str, type]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def set_key(cfg: object, key: str, value: object, rules: Rules) -> None:
    """Set `section.name` on cfg after checking that the key exists and the value fits."""
    sections = _field_types(cfg)
    section_name, _, name = key.partition(".")
    if section_name in SECTIONS and section_name not in sections:
        raise UserError(f"config key {key!r} belongs to {SECTIONS[section_name]}, not this command")
    if section_name not in sections or not name:
        raise UserError(f"unknown config key {key!r} (sections: {', '.join(sections)})")
    section = getattr(cfg, section_name)
    fields = _field_types(section)
    if name not in fields:
        raise UserError(f"unknown config key {key!r} (known in {section_name}: {', '.join(fields)})")
    setattr(section, name, _coerce(key, value, fields[name], rules))


def from_dict(cls: type, d: object, rules: Rules):
    """Build cls() from a nested dict, skipping the sections of other tools (SECTIONS)."""
    cfg = cls()
    own = _field_types(cfg)
    if not isinstance(d, dict):
        raise UserError(f"config must be a mapping of sections ({', '.join(own)})")
    for section, values in d.items():
        if section not in own and section in SECTIONS:
            continue  # another tool's section
        if section not in own:
            raise UserError(f"config section {section!r} is unknown (sections: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise UserError(f"config section {section!r} must be a mapping, got {values!r}")
        for name, value in values.items():
            set_key(cfg, f"{section}.{name}", value, rules)
    return cfg


def load(cls: type, path: str | Path | None, overrides: typing.Sequence[str], rules: Rules):
    """Load a YAML file (or the defaults when path is None) and apply `section.key=value` overrides."""
    d: object = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} not found")
        try:
            d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p}: not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"config file {p}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise UserError(f"config file {p}: cannot read it ({e.strerror})") from None
    cfg = from_dict(cls, d, rules)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq:
            raise UserError(f"override {item!r}: expected section.key=value")
        set_key(cfg, key.strip(), yaml.safe_load(raw) if raw.strip() else "", rules)
    return cfg
