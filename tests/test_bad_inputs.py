"""The bad-input matrix: for each bad input to cpc-stream, cpc-features, cpc-export and cpc-train, the exit
code, exactly one line on stderr that names the problem, no traceback, and nothing already produced lost
(the other streams' frames and end of stream, the other files' outputs).

Every command runs as its own process, as a user would run it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from conftest import REPO, UTT_1089, free_port

PROGRAMS = {
    "cpc-stream": "cpc_stream.cli",
    "cpc-features": "cpc_training.features",
    "cpc-export": "cpc_export.export",
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
        ("no source", [], "no source: give --mic, --file PATH or --stdin"),
        ("stdin rate 0", ["--stdin", "--stdin-rate", "0"], "--stdin-rate and --stdin-channels must be > 0"),
        ("duplicate stream names", ["--stdin", "--file", "{d}/stdin.wav"], "stream names must be unique"),
        ("negative subscriber count", [*ok, "--wait-subscribers", "-1"], "--wait-subscribers -1: expected a count >= 0"),
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


@pytest.mark.parametrize("case", stream_cases(), ids=[c[0] for c in stream_cases()])
def test_cpc_stream_refuses_bad_input_in_one_line(case, stream_inputs, taken_port, tmp_path):
    """Exit 2 before publishing anything, one line naming the problem, no traceback."""
    _, args, message = case
    good, d = stream_inputs
    subs = {"d": d, "taken": taken_port, "free": free_port()}
    args = [a.format(**subs) for a in args]
    if "--model" not in args:
        args = ["--model", str(good), *args]
    if "--bind" not in args:
        args += ["--bind", f"tcp://127.0.0.1:{free_port()}"]
    out = run("cpc-stream", *args, cwd=tmp_path, timeout=60)  # cwd: no config.yaml of the repo's
    assert_one_line_error(out, "cpc-stream", message)
