"""Shared fixtures: the bundled real LibriSpeech utterances (data/librispeech-mini, CC BY 4.0)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "data" / "librispeech-mini"
UTT_4051 = MINI / "train-clean-100/4051/11218/4051-11218-0044.flac"
UTT_2911 = MINI / "train-clean-100/2911/12359/2911-12359-0007.flac"
UTT_1089 = MINI / "test-clean/1089/134686/1089-134686-0001.flac"


@pytest.fixture(autouse=True)
def _few_threads():
    """Two cores here: keep torch from oversubscribing when tests run alongside worker processes."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_onnx(tmp_path_factory):
    """A small random-init model exported at F=4 (W=16), with its torch model for offline references."""
    import torch
    from cpc_export.graph import export_onnx
    from cpc_training import config
    from cpc_training.model import CPC

    cfg = config.load(None, ["model.enc_dim=64", "model.ctx_dim=32", "model.n_steps=4"])
    torch.manual_seed(0)
    model = CPC(cfg.model).eval()
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    export_onnx(model, cfg, 0, path, 4, 16)
    return path, model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A cpc-train checkpoint of a tiny model after 2 real training steps (32/16 dims, K=3)."""
    from cpc_training import config, train

    out = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = config.load(None, [f"data.root={MINI}", "model.enc_dim=32", "model.ctx_dim=16", "model.n_steps=3",
                             "data.window=3200", "data.workers=0", "negatives.count=8", "train.max_steps=2",
                             f"train.out_dir={out}", "train.threads=1"])  # fmt: skip
    train.train(cfg, quiet=True)
    return out / "checkpoint.pt"


# -- running the daemon ------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(model_path, *args, port=None, **popen):
    """cpc-stream as a user runs it, publishing on a free loopback port. Returns (process, endpoint)."""
    import subprocess
    import sys

    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "cpc_stream.cli",
        "--model",
        str(model_path),
        "--bind",
        f"tcp://127.0.0.1:{port}",
        *args,
    ]
    popen = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(cmd, cwd=REPO, **popen), f"tcp://127.0.0.1:{port}"


def collect(sub, streams: int, timeout: float = 60.0):
    """Receive until `streams` end-of-stream messages; returns {stream: {kind: [messages]}}, {stream: eos}."""
    import time

    got, eos, deadline = {}, {}, time.monotonic() + timeout
    while len(eos) < streams and time.monotonic() < deadline:
        msg = sub.recv(timeout=1.0)
        if msg is None:
            continue
        if msg.kind == "eos":
            eos[msg.stream] = msg.header
        else:
            got.setdefault(msg.stream, {}).setdefault(msg.kind, []).append(msg)
    return got, eos


def frames_of(msgs):
    import numpy as np

    return np.concatenate([m.data for m in msgs])
