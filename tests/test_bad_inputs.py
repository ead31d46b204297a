"""The bad-input matrix: for each bad input to cpc-stream, cpc-features, cpc-export and cpc-train (CPC_audio
checkpoints that cannot be streamed among them), the exit code, exactly one line on stderr that names the
problem, no traceback, and nothing already produced lost (the other streams' frames and end of stream,
the other files' outputs).

Every command runs as its own process, as a user would run it."""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import MINI, REPO, UTT_1089, UTT_4051, free_port

PROGRAMS = {
    "cpc-stream": "cpc_stream.cli",
    "cpc-features": "cpc_training.features",
    "cpc-export": "cpc_export.cli",
    "cpc-train": "cpc_training.train",
}


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    lines: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.lines = [line for line in self.stderr.splitlines() if line.strip()]


def run(program: str, *args: str, timeout: float = 120, cwd=REPO, **kw) -> Outcome:
    r = subprocess.run(
        [sys.executable, "-m", PROGRAMS[program], *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw,
    )  # fmt: skip
    return Outcome(r.returncode, r.stdout, r.stderr)


def assert_one_line_error(out: Outcome, program: str, message: str, code: int = 2) -> None:
    """Exit `code`, no traceback, and exactly one stderr line `<program>: error: ...` matching `message`."""
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.lines if line.startswith(f"{program}: error: ")]
    assert len(errors) == 1, out.stderr
    assert re.search(message, errors[0]), (message, errors[0])
    assert out.code == code, (out.code, out.stderr)


# == cpc-stream ==========================================================================================
@pytest.fixture(scope="module")
def stream_inputs(small_onnx, tmp_path_factory):
    """Bad models, audio, configs and keys for cpc-stream, next to the good small model."""
    import onnx

    from cpc_stream.security import write_key_pair

    good, _ = small_onnx
    d = tmp_path_factory.mktemp("bad_stream")
    (d / "garbage.onnx").write_bytes(b"nope")
    (d / "folder.onnx").mkdir()
    proto = onnx.load(str(good))
    meta = {p.key: p.value for p in proto.metadata_props}
    shapes = json.loads(meta["state_shapes"])
    contradictions = {  # metadata that contradicts the graph, one key at a time
        "frames": {"frames_per_call": "8"}, "ctx": {"ctx_dim": "33"}, "enc": {"enc_dim": "65"},
        "steps": {"n_steps": "5"}, "hop": {"hop": "100"},
        "state": {"state_shapes": json.dumps({**shapes, "z_history": ["B", 7, 64]})},
        "format": {"cpc_stream.format": "cpc-stream-onnx/9"},
    }  # fmt: skip
    for name, change in contradictions.items():
        onnx.helper.set_model_props(proto, {**meta, **change})
        onnx.save(proto, str(d / f"meta-{name}.onnx"))
    (d / "not-audio.wav").write_text("this is text, not audio\n")
    (d / "folder.wav").mkdir()
    (d / "stdin.wav").write_bytes(UTT_1089.read_bytes())
    (d / "latin1.yaml").write_bytes("stream:\n  bind: caf\xe9\n".encode("latin-1"))
    (d / "bogus.yaml").write_text("bogus:\n  key: 1\n")
    (d / "broken.yaml").write_text("stream: [unclosed\n")
    keys, allowed, empty, badkeys = d / "keys", d / "allowed", d / "empty", d / "badkeys"
    for p in (keys, allowed, empty, badkeys):
        p.mkdir()
    for name in ("server", "client"):
        write_key_pair(keys, name)
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    (badkeys / "client.key").write_text("not a key\n")
    (keys / "open.key_secret").write_bytes((keys / "server.key_secret").read_bytes())
    (keys / "open.key_secret").chmod(0o644)
    return good, d


def stream_cases():
    ok = ["--file", str(UTT_1089)]
    secret, allowed = "{d}/keys/server.key_secret", "stream.curve_allowed_keys={d}/allowed"
    return [  # (id, arguments, what the one error line must say)
        ("garbage model", ["--model", "{d}/garbage.onnx", *ok], "garbage.onnx is not a loadable ONNX graph"),
        ("missing model", ["--model", "{d}/none.onnx", *ok], "model file .*none.onnx not found"),
        ("model is a folder", ["--model", "{d}/folder.onnx", *ok], "folder.onnx is a folder"),
        ("metadata frames_per_call", ["--model", "{d}/meta-frames.onnx", *ok], "metadata implies audio of shape \\['B', 1280\\], the graph has"),
        ("metadata ctx_dim", ["--model", "{d}/meta-ctx.onnx", *ok], "metadata implies c of shape \\['B', 4, 33\\]"),
        ("metadata enc_dim", ["--model", "{d}/meta-enc.onnx", *ok], "metadata implies z of shape \\['B', 4, 65\\]"),
        ("metadata n_steps", ["--model", "{d}/meta-steps.onnx", *ok], "metadata implies scores of shape \\['B', 4, 5\\]"),
        ("metadata hop", ["--model", "{d}/meta-hop.onnx", *ok], "metadata implies audio of shape \\['B', 400\\]"),
        ("metadata state shape", ["--model", "{d}/meta-state.onnx", *ok], "metadata implies z_history of shape \\['B', 7, 64\\]"),
        ("model format", ["--model", "{d}/meta-format.onnx", *ok], "model format 'cpc-stream-onnx/9' is not supported"),
        ("missing audio", ["--file", "/no/such.wav"], "cannot read audio file /no/such.wav: no such file"),
        ("audio is a folder", ["--file", "{d}/folder.wav"], "folder.wav: is a folder, not an audio file"),
        ("audio is text", ["--file", "{d}/not-audio.wav"], "not-audio.wav: not a readable audio file"),
        ("bind in use", [*ok, "--bind", "tcp://127.0.0.1:{taken}"], "cannot bind tcp://127.0.0.1:\\d+: Address already in use"),
        ("port out of range", [*ok, "--bind", "tcp://127.0.0.1:99999"], "port '99999' is not 1-65535"),
        ("bind without transport", [*ok, "--bind", "localhost:5556"], "expected tcp://HOST:PORT"),
        ("unsupported transport", [*ok, "--bind", "inproc://x"], "transport 'inproc' is not supported"),
        ("routable bind in clear", [*ok, "--bind", "tcp://0.0.0.0:{free}"], "reachable from other machines and CURVE is off"),
        ("hwm 0", [*ok, "stream.hwm=0"], "config key stream.hwm: must be > 0"),
        ("unknown key", [*ok, "--set", "stream.hwn=3"], "unknown config key 'stream.hwn'"),
        ("NaN interval", [*ok, "stream.meta_interval=.nan"], "stream.meta_interval: must be a finite number"),
        ("Inf queue", [*ok, "stream.queue_seconds=.inf"], "stream.queue_seconds: must be a finite number"),
        ("threads 0", [*ok, "stream.threads=0"], "stream.threads: must be > 0"),
        ("cuda without onnxruntime-gpu", [*ok, "stream.providers=cuda"], "CUDA provider asked for"),
        ("another tool's key", [*ok, "model.enc_dim=3"], "config key 'model.enc_dim' belongs to cpc-train"),
        ("config not UTF-8", [*ok, "--config", "{d}/latin1.yaml"], "latin1.yaml: not UTF-8 text"),
        ("config section unknown", [*ok, "--config", "{d}/bogus.yaml"], "config section 'bogus' is unknown"),
        ("config not YAML", [*ok, "--config", "{d}/broken.yaml"], "broken.yaml: not valid YAML"),
        ("config missing", [*ok, "--config", "{d}/none.yaml"], "config file .*none.yaml not found"),
        ("allowed keys without a secret key", [*ok, allowed], "curve_allowed_keys is set but stream.curve_secret_key is empty"),
        ("secret key without allowed keys", [*ok, f"stream.curve_secret_key={secret}"], "curve_secret_key is set but stream.curve_allowed_keys is empty"),
        ("secret key missing", [*ok, "stream.curve_secret_key={d}/keys/none", allowed], "none: no such file"),
        ("secret key readable by others", [*ok, "stream.curve_secret_key={d}/keys/open.key_secret", allowed], "readable by other users \\(mode 0644\\)"),
        ("public key as secret", [*ok, "stream.curve_secret_key={d}/keys/client.key", allowed], "client.key: readable by other users|holds no secret key"),
        ("allowed folder missing", [*ok, f"stream.curve_secret_key={secret}", "stream.curve_allowed_keys={d}/none"], "none: no such folder"),
        ("allowed folder empty", [*ok, f"stream.curve_secret_key={secret}", "stream.curve_allowed_keys={d}/empty"], "holds no client public key"),
        ("allowed key not a key", [*ok, f"stream.curve_secret_key={secret}", "stream.curve_allowed_keys={d}/badkeys"], "client.key is not a public key file"),
        ("unknown microphone", ["--mic", "no-such-device-xyz"], "audio input device 'no-such-device-xyz' not found|needs PortAudio"),
        ("no source", [], "no source: give --mic, --file PATH, --stdin or --listen HOST:PORT"),
        ("stdin rate 0", ["--stdin", "--stdin-rate", "0"], "--stdin-rate and --stdin-channels must be > 0"),
        ("duplicate stream names", ["--stdin", "--file", "{d}/stdin.wav"], "stream names must be unique"),
        ("negative subscriber count", [*ok, "--wait-subscribers", "-1"], "--wait-subscribers -1: expected a count >= 0"),
        ("listen port out of range", ["--listen", "127.0.0.1:99999"], "stream.listen '127.0.0.1:99999': expected HOST:PORT"),
        ("listen to all without a token", ["--listen", "0.0.0.0:{free}"], "has no stream.ingest_token: set one, or pass --insecure"),
        ("listen port in use", ["--listen", "127.0.0.1:{taken_tcp}"], "cannot listen on 127.0.0.1:\\d+"),
        ("TLS certificate without key", ["--listen", "127.0.0.1:{free}", "stream.tls_cert={d}/keys/server.key"], "tls_cert and stream.tls_key go together"),
        ("TLS files not PEM", ["--listen", "127.0.0.1:{free}", "stream.tls_cert={d}/keys/server.key", "stream.tls_key={d}/keys/server.key"], "cannot load"),
        ("metrics port in use", [*ok, "--metrics", "127.0.0.1:{taken_tcp}"], "cannot serve metrics on 127.0.0.1:\\d+"),
        ("zero max streams", ["--listen", "127.0.0.1:{free}", "--max-streams", "0"], "stream.max_streams: must be > 0"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def taken_port():
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield port
    sock.close(0)
    ctx.term()


@pytest.fixture(scope="module")
def taken_tcp_port():
    """A loopback TCP port held by a listening socket of this process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("case", stream_cases(), ids=[c[0] for c in stream_cases()])
def test_cpc_stream_refuses_bad_input_in_one_line(case, stream_inputs, taken_port, taken_tcp_port, tmp_path):
    """Exit 2 before publishing anything, one line naming the problem, no traceback."""
    _, args, message = case
    good, d = stream_inputs
    subs = {"d": d, "taken": taken_port, "free": free_port(), "taken_tcp": taken_tcp_port}
    args = [a.format(**subs) for a in args]
    if "--model" not in args:
        args = ["--model", str(good), *args]
    if "--bind" not in args:
        args += ["--bind", f"tcp://127.0.0.1:{free_port()}"]
    out = run("cpc-stream", *args, cwd=tmp_path, timeout=60)  # cwd: no config.yaml of the repo's
    assert_one_line_error(out, "cpc-stream", message)


# ---------------------------------------------------------------------------------------------------------
# Offline tools: cpc-features, cpc-export, cpc-train.
#
# Each row: (id, program, arguments, regex of its one error line, .npz files that must still be written).
# Arguments are templates: {ckpt} the tiny checkpoint, {good} a real utterance, {out} a fresh folder of the
# row's own (empty), and the names of the bad inputs made by `offline_inputs` below.

GOOD_NPZ = "1089-134686-0001.npz"  # cpc-features' output for {good}
TINY_TRAIN = ["--quiet", "data.root={root}", "model.enc_dim=32", "model.ctx_dim=16", "model.n_steps=3",
              "data.window=3200", "data.workers=0", "negatives.count=8", "train.max_steps=3"]  # fmt: skip
FEATURES = ["--checkpoint", "{ckpt}", "--out", "{out}"]
EXPORT = ["--checkpoint", "{ckpt}", "--out", "{out}/m.onnx", "--check-calls", "5"]

OFFLINE_CASES = [
    # cpc-features: the checkpoint
    ("features-missing-checkpoint", "cpc-features", ["--checkpoint", "{tmp}/none.pt", "--out", "{out}", "{good}"],
     r"checkpoint .*none\.pt not found", []),
    ("features-garbage-checkpoint", "cpc-features", ["--checkpoint", "{garbage}", "--out", "{out}", "{good}"],
     r"checkpoint .*garbage\.pt is unreadable", []),
    ("features-foreign-checkpoint", "cpc-features", ["--checkpoint", "{foreign}", "--out", "{out}", "{good}"],
     r"checkpoint .*foreign\.pt is not a cpc-train checkpoint", []),
    ("features-damaged-weights", "cpc-features", ["--checkpoint", "{damaged}", "--out", "{out}", "{good}"],
     r"checkpoint .*damaged\.pt is damaged: CRC mismatch in archive/data/", []),
    ("features-checkpoint-folder", "cpc-features", ["--checkpoint", "{tmp}", "--out", "{out}", "{good}"],
     r"checkpoint .* is a folder", []),
    # cpc-features: options
    ("features-out-is-a-file", "cpc-features", ["--checkpoint", "{ckpt}", "--out", "{afile}", "{good}"],
     r"--out .*afile is a file; give a folder", []),
    ("features-out-not-writable", "cpc-features", ["--checkpoint", "{ckpt}", "--out", "{readonly}", "{good}"],
     r"--out .*readonly is not writable", []),
    ("features-out-under-a-file", "cpc-features", ["--checkpoint", "{ckpt}", "--out", "{afile}/feats", "{good}"],
     r"cannot create output folder .*afile/feats: Not a directory", []),
    ("features-window-0", "cpc-features", [*FEATURES, "--window", "0", "{good}"], r"--window 0: expected 1\.\.4096", []),
    ("features-window-huge", "cpc-features", [*FEATURES, "--window", "100000", "{good}"],
     r"--window 100000: expected 1\.\.4096", []),
    ("features-chunk-0", "cpc-features", [*FEATURES, "--chunk-seconds", "0", "{good}"],
     r"--chunk-seconds 0\.0: expected 0\.01\.\.3600", []),
    # cpc-features: one bad file among good ones; the good ones are still written
    ("features-not-audio", "cpc-features", [*FEATURES, "{notes}", "{good}"],
     r"cannot read audio file .*notes\.wav: not a readable audio file", [GOOD_NPZ]),
    ("features-folder", "cpc-features", [*FEATURES, "{good}", "{folder}"],
     r"cannot read audio file .*folder\.wav: is a folder", [GOOD_NPZ]),
    ("features-missing-file", "cpc-features", [*FEATURES, "{tmp}/gone.wav", "{good}"],
     r"cannot read audio file .*gone\.wav: no such file", [GOOD_NPZ]),
    ("features-truncated-flac", "cpc-features", [*FEATURES, "{truncated}", "{good}"],
     r"cannot read audio file .*truncated\.flac", [GOOD_NPZ]),
    ("features-same-name-twice", "cpc-features", [*FEATURES, "{good}", "{good_copy}"],
     r"1089-134686-0001\.flac: .*1089-134686-0001\.npz is already the output of .*; rename one", [GOOD_NPZ]),
    ("features-permission-denied", "cpc-features", [*FEATURES, "{locked}", "{good}"],
     r"cannot read audio file .*locked\.wav: permission denied", [GOOD_NPZ]),
    # cpc-export
    ("export-missing-checkpoint", "cpc-export", ["--checkpoint", "{tmp}/none.pt", "--out", "{out}/m.onnx"],
     r"checkpoint .*none\.pt not found", []),
    ("export-foreign-checkpoint", "cpc-export", ["--checkpoint", "{foreign}", "--out", "{out}/m.onnx"],
     r"checkpoint .*foreign\.pt is not a cpc-train checkpoint", []),
    ("export-damaged-weights", "cpc-export", ["--checkpoint", "{damaged}", "--out", "{out}/m.onnx"],
     r"checkpoint .*damaged\.pt is damaged: CRC mismatch in archive/data/", []),
    ("export-step-not-an-integer", "cpc-export", ["--checkpoint", "{step_text}", "--out", "{out}/m.onnx"],
     r"checkpoint .*step_text\.pt: step is '300', expected an integer >= 0", []),
    ("export-step-fraction", "cpc-export", ["--checkpoint", "{step_float}", "--out", "{out}/m.onnx"],
     r"checkpoint .*step_float\.pt: step is 2\.5, expected an integer >= 0", []),
    ("export-out-is-a-folder", "cpc-export", ["--checkpoint", "{ckpt}", "--out", "{tmp}"],
     r"--out .* is a folder; give a file name", []),
    ("export-out-folder-missing", "cpc-export", ["--checkpoint", "{ckpt}", "--out", "{tmp}/no/m.onnx"],
     r"--out .*m\.onnx: output folder .*no does not exist", []),
    ("export-out-not-writable", "cpc-export", ["--checkpoint", "{ckpt}", "--out", "{readonly}/m.onnx"],
     r"--out .*readonly/m\.onnx is not writable", []),
    ("export-frames-per-call-huge", "cpc-export", [*EXPORT, "--frames-per-call", "100000"],
     r"--frames-per-call 100000: expected 1\.\.100", []),
    ("export-frames-per-call-0", "cpc-export", [*EXPORT, "--frames-per-call", "0"], r"--frames-per-call 0: expected 1\.\.100", []),
    ("export-neg-window-0", "cpc-export", [*EXPORT, "--neg-window", "0"], r"--neg-window 0: expected 1\.\.4096", []),
    ("export-check-calls-huge", "cpc-export", [*EXPORT, "--check-calls", "1000000"],
     r"--check-calls 1000000: expected 1\.\.10000", []),
    ("export-check-audio-not-audio", "cpc-export", [*EXPORT, "--check-audio", "{notes}"],
     r"cannot read audio file .*notes\.wav: not a readable audio file", []),
    ("export-check-not-a-graph", "cpc-export", ["--checkpoint", "{ckpt}", "--check", "{notes}"],
     r"notes\.wav is not a loadable ONNX graph", []),
    ("export-check-graph-of-another-model", "cpc-export", ["--checkpoint", "{ckpt}", "--check", "{other_graph}"],
     r"small\.onnx was exported from config \w+ step 0, not from .*checkpoint\.pt \(config \w+ step 2\)", []),
    # cpc-export and cpc-features: CPC_audio checkpoints whose model does not stream (the other refusals:
    # tests/test_cpc_audio.py)
    ("export-cpc-audio-transformer-ar", "cpc-export", ["--checkpoint", "{cpc_audio_transformer}", "--out", "{out}/m.onnx"],
     r"transformer\.pt: CPC_audio arMode='transformer' is not supported", []),
    ("features-cpc-audio-instance-norm", "cpc-features", ["--checkpoint", "{cpc_audio_instance_norm}", "--out", "{out}", "{good}"],
     r"CPC_audio normMode='instanceNorm' is not supported", []),
    # cpc-train: configuration
    ("train-unknown-key", "cpc-train", [*TINY_TRAIN, "train.out_dir={out}", "train.nosuch=1"],
     r"unknown config key 'train\.nosuch'", []),
    ("train-wrong-type", "cpc-train", [*TINY_TRAIN, "train.out_dir={out}", "train.max_steps=abc"],
     r"config key train\.max_steps: expected int, got 'abc'", []),
    ("train-negative-lr", "cpc-train", [*TINY_TRAIN, "train.out_dir={out}", "train.lr=-1"],
     r"config key train\.lr: must be > 0", []),
    ("train-window-not-hops", "cpc-train", [*TINY_TRAIN, "train.out_dir={out}", "data.window=1000"],
     r"config key data\.window: 1000 is not a multiple of the 160-sample hop", []),
    ("train-missing-root", "cpc-train", [*TINY_TRAIN, "train.out_dir={out}", "data.root={tmp}/nodata"],
     r"dataset root .*nodata is not a directory", []),
    ("train-missing-config", "cpc-train", ["--config", "{tmp}/none.yaml", "train.out_dir={out}"],
     r"config file .*none\.yaml not found", []),
    # cpc-train: resuming from a bad checkpoint.pt in train.out_dir
    ("train-resume-damaged", "cpc-train", [*TINY_TRAIN, "train.out_dir={run_damaged}"],
     r"checkpoint .*checkpoint\.pt is damaged: CRC mismatch", []),
    ("train-resume-step-not-an-integer", "cpc-train", [*TINY_TRAIN, "train.out_dir={run_step_text}"],
     r"checkpoint .*checkpoint\.pt: step is '300', expected an integer", []),
]  # fmt: skip


def damage_weights(src: Path, dest: Path) -> None:
    """Copy checkpoint src to dest with one byte of its largest tensor flipped (its CRC left as it was)."""
    import zipfile

    shutil.copy(src, dest)
    with zipfile.ZipFile(dest) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(dest, "r+b") as f:
        f.seek(member.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0xFF]))


def drop_file_override() -> None:
    """In the child, before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    that even root obeys file permissions (chmod 000 then denies it, as it denies any user)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; fails harmlessly where the process lacks them


@pytest.fixture(scope="module")
def offline_inputs(tmp_path_factory, tiny_checkpoint, small_onnx) -> dict[str, Path]:
    import torch

    d = tmp_path_factory.mktemp("offline_inputs")
    p = {"ckpt": tiny_checkpoint, "good": UTT_1089, "root": MINI, "tmp": d, "other_graph": small_onnx[0]}
    p["garbage"] = d / "garbage.pt"
    p["garbage"].write_bytes(b"\x00" * 100)
    p["foreign"] = d / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, p["foreign"])
    state = torch.load(tiny_checkpoint, weights_only=False)
    for name, step in (("step_text", "300"), ("step_float", 2.5)):
        p[name] = d / f"{name}.pt"
        torch.save({**state, "step": step}, p[name])
    p["damaged"] = d / "damaged.pt"
    damage_weights(tiny_checkpoint, p["damaged"])
    for run_dir, src in (("run_damaged", p["damaged"]), ("run_step_text", p["step_text"])):
        p[run_dir] = d / run_dir
        p[run_dir].mkdir()
        shutil.copy(src, p[run_dir] / "checkpoint.pt")
    p["notes"] = d / "notes.wav"
    p["notes"].write_text("not audio at all\n")
    p["afile"] = d / "afile"
    p["afile"].write_text("")
    p["folder"] = d / "folder.wav"
    p["folder"].mkdir()
    p["truncated"] = d / "truncated.flac"
    p["truncated"].write_bytes(UTT_4051.read_bytes()[:20000])
    p["good_copy"] = d / "copy" / UTT_1089.name
    p["good_copy"].parent.mkdir()
    shutil.copy(UTT_1089, p["good_copy"])
    p["locked"] = d / "locked.wav"
    shutil.copy(UTT_1089, p["locked"])
    p["locked"].chmod(0)
    p["readonly"] = d / "readonly"
    p["readonly"].mkdir()
    p["readonly"].chmod(0o555)
    # CPC_audio checkpoints in its released format, {"config", "weights"} (training/cpc_audio.py)
    for name, config in (
        ("transformer", {"arMode": "transformer"}),
        ("instance_norm", {"normMode": "instanceNorm"}),
    ):
        p[f"cpc_audio_{name}"] = d / f"{name}.pt"
        torch.save({"config": config, "weights": {}}, p[f"cpc_audio_{name}"])
    return p


def assert_valid_features(path: Path, audio: Path) -> None:
    """path is cpc-features' .npz of `audio`: every array there, finite, one frame per 10 ms."""
    got = np.load(path)
    frames = sf.info(str(audio)).frames // 160
    assert got["z"].shape[0] == got["c"].shape[0] == got["scores"].shape[0] == frames, path
    assert np.isfinite(got["c"]).all() and np.isfinite(got["z"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("case", OFFLINE_CASES, ids=[c[0] for c in OFFLINE_CASES])
def test_offline_bad_input(case, offline_inputs, tmp_path):
    name, program, template, message, outputs = case
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(**offline_inputs, out=out) for a in template]
    # Run as root, the command would read and write anything: without that capability, it obeys
    # permissions (the permission rows), and every other row runs as it would for a user.
    result = run(program, *args, preexec_fn=drop_file_override)
    assert_one_line_error(result, program, message)
    for npz in outputs:
        assert_valid_features(out / npz, UTT_1089)
    if program == "cpc-export":  # nothing written, no temporary left in the output folder
        assert list(out.iterdir()) == []


# Inputs that are not errors: cpc-features repairs or accepts them with one warning line, exit 0.
OFFLINE_WARNINGS = [
    ("features-nan-audio", "{nan}", r"nan\.wav: 3 non-finite samples \(NaN or Inf\) replaced with 0", 1),
    ("features-empty-wav", "{empty}", r"empty\.wav: 0 samples at 16000 Hz, shorter than one 160-sample frame", 0),
    ("features-100-samples", "{short}", r"short\.wav: 100 samples at 16000 Hz, shorter than one 160-sample", 0),
]  # fmt: skip


@pytest.fixture(scope="module")
def odd_audio(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("odd_audio")
    speech, _ = sf.read(str(UTT_1089), dtype="float32")
    speech[[10, 2000, 30000]] = [np.nan, np.inf, -np.inf]
    sf.write(d / "nan.wav", speech, 16000, subtype="FLOAT")
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(d / "short.wav", np.full(100, 0.1, np.float32), 16000)
    return {"nan": d / "nan.wav", "empty": d / "empty.wav", "short": d / "short.wav"}


@pytest.mark.slow
@pytest.mark.parametrize("case", OFFLINE_WARNINGS, ids=[c[0] for c in OFFLINE_WARNINGS])
def test_offline_odd_audio_is_a_warning(case, odd_audio, tiny_checkpoint, tmp_path):
    """The odd file gives one warning line and its .npz (finite; 0 frames when shorter than a hop), and
    the good file after it is written as well."""
    _, template, message, has_frames = case
    src = Path(template.format(**odd_audio))
    result = run(
        "cpc-features", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), str(src), str(UTT_1089)
    )
    assert result.code == 0 and "Traceback" not in result.stderr and len(result.lines) == 1, result.stderr
    assert result.lines[0].startswith("cpc-features: warning: ") and re.search(message, result.lines[0])
    got = np.load(tmp_path / f"{src.stem}.npz")
    assert np.isfinite(got["c"]).all() and (got["c"].shape[0] > 0) == bool(has_frames)
    assert_valid_features(tmp_path / GOOD_NPZ, UTT_1089)


@pytest.mark.slow
def test_offline_bad_files_among_good_ones_lose_nothing(offline_inputs, tmp_path):
    """Good, bad, good, bad: each bad file is one error line, both good files are written and valid,
    and a summary line says how many failed (exit 2)."""
    files = [UTT_1089, offline_inputs["notes"], UTT_4051, offline_inputs["folder"]]
    result = run(
        "cpc-features", "--checkpoint", str(offline_inputs["ckpt"]), "--out", str(tmp_path), *map(str, files)
    )
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr
    assert [line.split(": error: ")[1][:22] for line in result.lines[:2]] == ["cannot read audio file"] * 2
    assert result.lines[2:] == ["cpc-features: 2 of 4 files could not be read; the other 2 are written"]
    assert_valid_features(tmp_path / GOOD_NPZ, UTT_1089)
    assert_valid_features(tmp_path / "4051-11218-0044.npz", UTT_4051)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1089-134686-0001.npz", "4051-11218-0044.npz"]
