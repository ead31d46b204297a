"""cpc-train end to end on the bundled real speech: it learns, resumes exactly, and fails cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import MINI, REPO
from cpc_training import checkpoint, config, train

from cpc_stream.errors import UserError

TINY = [
    f"data.root={MINI}",
    "model.enc_dim=64",
    "model.ctx_dim=32",
    "model.n_steps=4",
    "data.window=6400",
    "data.batch_size=8",
    "data.workers=0",
    "negatives.count=32",
    "train.lr=2e-3",
    "train.warmup_steps=5",
    "train.threads=1",
    "train.log_every=1",
]


def tiny(tmp_path, *extra):
    return config.load(None, [*TINY, f"train.out_dir={tmp_path}", *extra])


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_short_cpu_run_learns_real_speech(tmp_path):
    """Loss falls and k=1 accuracy rises far above chance (1/33 with 32 negatives)."""
    summary = train.train(tiny(tmp_path, "train.max_steps=100"), quiet=True)
    rows = metrics(tmp_path)
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-10:]) / 10
    k1 = sum(r["acc"][0] for r in rows[-10:]) / 10
    assert last < first - 1.0, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert k1 > 0.15, f"k=1 accuracy {k1:.3f} is not well above chance 0.03"
    assert summary["step"] == 100 and (tmp_path / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    steps = ["train.max_steps=60", "train.ckpt_every=3"]
    train.train(tiny(straight, *steps), quiet=True)

    # The same run as a real process, SIGKILLed mid-way (possibly mid-checkpoint), then resumed.
    cmd = [
        sys.executable,
        "-m",
        "cpc_training.train",
        "--quiet",
        *TINY,
        f"train.out_dir={interrupted}",
        *steps,
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    log = interrupted / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 10:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(interrupted / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < killed_at < 60
    train.train(tiny(interrupted, *steps), quiet=True)

    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(interrupted / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 60
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resume"
    assert a["scheduler"] == b["scheduler"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact."""
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint(path, {"step": 1})

    def crash(*args, **kwargs):
        raise OSError("disk died")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(path, {"step": 2})
    assert torch.load(path, weights_only=False) == {"step": 1}


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    def nan_loss(model, z, c, neg_idx):
        return (z.sum() * float("nan")), torch.zeros(model.cfg.n_steps)

    monkeypatch.setattr(train, "info_nce", nan_loss)
    with pytest.raises(UserError, match="non-finite loss .* at step 0"):
        train.train(tiny(tmp_path, "train.max_steps=3"), quiet=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.nosuch=1"], "cpc-train: error: unknown config key 'train.nosuch'"),
        (["data.root=/no/such/dir"], "cpc-train: error: dataset root /no/such/dir is not a directory"),
        (["data.window=1000"], "cpc-train: error: config key data.window: 1000 is not a multiple"),
        (["--config", "/no/config.yaml"], "cpc-train: error: config file /no/config.yaml not found"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    r = subprocess.run(
        [sys.executable, "-m", "cpc_training.train", f"train.out_dir={tmp_path}", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(message)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    train.train(tiny(tmp_path, "train.max_steps=1"), quiet=True)
    with pytest.raises(UserError, match="trained with another model config"):
        train.train(tiny(tmp_path, "train.max_steps=2", "model.ctx_dim=16"), quiet=True)


@pytest.mark.slow
def test_two_process_ddp_run_on_cpu(tmp_path):
    """The torchrun path (DDP over gloo) trains, averages the metrics of both ranks and checkpoints once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cpc_training.train", "--quiet", *TINY, f"train.out_dir={tmp_path}", "train.max_steps=4"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("cpc-train: done: step 4") == 1  # rank 0 only
    assert len(metrics(tmp_path)) == 4
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 4


@pytest.mark.slow
def test_resume_after_a_kill_between_checkpoints_logs_each_step_once(tmp_path):
    """A run SIGKILLed after logging steps its last checkpoint does not hold resumes from that checkpoint
    and logs those steps again: metrics.jsonl keeps only the records up to the checkpoint's step, so that
    every step appears once."""
    steps = ["train.max_steps=30", "train.ckpt_every=10"]
    cmd = [sys.executable, "-m", "cpc_training.train", "--quiet", *TINY, f"train.out_dir={tmp_path}", *steps]
    proc = subprocess.Popen(cmd, cwd=REPO)
    log, logged = tmp_path / "metrics.jsonl", 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not 13 <= logged <= 16:
        logged = len(log.read_text().splitlines()) if log.exists() else 0
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    at_kill = [r["step"] for r in metrics(tmp_path)]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"]
    assert saved == 10 and max(at_kill) > saved  # steps after the checkpoint were logged, then lost
    train.train(tiny(tmp_path, *steps), quiet=True)
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 31))
