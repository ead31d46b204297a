"""Configuration: every key is declared, checked and overridable; mistakes are one-line errors."""

import pytest
from conftest import REPO
from cpc_training import config

from cpc_stream.errors import UserError


def test_repo_config_yaml_loads_with_the_papers_model():
    cfg = config.load(REPO / "config.yaml")
    assert (cfg.model.enc_dim, cfg.model.ctx_dim, cfg.model.n_steps) == (512, 256, 12)
    assert cfg.data.window == 20480 and cfg.train.lr == pytest.approx(2e-4)


def test_overrides_are_typed_and_accept_exponent_floats():
    cfg = config.load(None, ["train.lr=2e-3", "model.norm=channel", "train.compile=true", "data.window=3200"])
    assert cfg.train.lr == pytest.approx(2e-3) and cfg.model.norm == "channel"
    assert cfg.train.compile is True and cfg.data.window == 3200


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'"),
        ("nosuch.key=1", "unknown config key 'nosuch.key'"),
        ("model.enc_dim=big", "model.enc_dim: expected int"),
        ("model.norm=instance", "model.norm: 'instance' is not one of none, channel"),
        ("negatives.count=0", "negatives.count: must be > 0"),
        ("train.lr", "expected section.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_problem(override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(None, [override])


def test_model_hash_changes_with_model_config_only():
    a, b = config.load(None), config.load(None, ["train.lr=1.0"])
    c = config.load(None, ["model.ctx_dim=128"])
    assert a.model_hash() == b.model_hash() != c.model_hash()
