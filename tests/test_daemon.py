"""cpc-stream end to end over real ZeroMQ on loopback: files, stdin, several streams, slow subscribers,
CURVE, signals and bad input."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import soxr
import zmq
import zmq.auth
from conftest import REPO, UTT_1089, UTT_2911
from cpc_training.features import extract

from cpc_stream.audio import load_audio
from cpc_stream.client import Subscriber


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(model_path, *args, port=None):
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
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    return proc, f"tcp://127.0.0.1:{port}"


def collect(sub, streams: int, timeout: float = 60.0):
    """Receive until `streams` end-of-stream messages; returns {stream: {kind: [messages]}}, eos headers."""
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
    return np.concatenate([m.data for m in msgs])


def test_file_frames_arrive_complete_and_equal_offline_features(small_onnx, tmp_path):
    path, model = small_onnx
    stereo = tmp_path / "stereo44k.wav"  # the real utterance as 44.1 kHz, 24-bit stereo
    speech, sr = sf.read(str(UTT_2911), dtype="float32")
    up = soxr.resample(speech, sr, 44100)
    sf.write(stereo, np.stack([up, 0.25 * up], axis=1), 44100, subtype="PCM_24")
    proc, endpoint = start_daemon(
        path, "--file", str(UTT_1089), "--file", str(stereo), "--wait-subscribers", "1"
    )
    with Subscriber(endpoint, kinds=("c", "scores")) as sub:
        meta = sub.wait_meta(timeout=30)
        got, eos = collect(sub, 2)
        assert sub.gaps == []
    assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()
    assert meta["model"]["ctx_dim"] == 32 and meta["streams"] == ["1089-134686-0001-0", "stereo44k-1"]
    for name, src in (("1089-134686-0001-0", UTT_1089), ("stereo44k-1", stereo)):
        wav = load_audio(src, 16000)
        ref = extract(model, wav, 16)
        c = frames_of(got[name]["c"])
        assert len(c) == len(wav) // 160 == eos[name]["frames"], name  # exactly duration / 10 ms
        assert np.abs(c - ref["c"]).max() < 1e-4, name
        scores = frames_of(got[name]["scores"])
        assert scores.shape == (len(c), 2, 4)
        assert np.allclose(scores[:, 1], ref["logprob"], atol=1e-3, equal_nan=True)
        assert [m.header["frame"] for m in got[name]["c"]] == list(range(0, len(c), 4))[: len(got[name]["c"])]
        assert eos[name]["reason"] == "end of file"


def test_stdin_raw_pcm(small_onnx):
    path, model = small_onnx
    wav = load_audio(UTT_1089, 16000)
    pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2")
    proc, endpoint = start_daemon(path, "--stdin", "--wait-subscribers", "1")
    with Subscriber(endpoint, kinds=("c",)) as sub:
        sub.wait_meta(timeout=30)
        proc.stdin.write(pcm.tobytes() + b"\x01")  # a stray byte: half a sample, dropped and said so
        proc.stdin.close()
        got, eos = collect(sub, 1)
    assert proc.wait(timeout=30) == 0
    c = frames_of(got["stdin"]["c"])
    assert len(c) == len(wav) // 160
    ref = extract(model, pcm.astype(np.float32) / 32768, 16)["c"]
    assert np.abs(c - ref).max() < 1e-4
    assert "1 trailing bytes of a partial sample dropped" in eos["stdin"]["reason"]


def test_slow_subscriber_sees_gaps_and_never_slows_the_daemon(small_onnx):
    path, _ = small_onnx
    duration = sf.info(str(UTT_1089)).duration
    proc, endpoint = start_daemon(path, "--file", str(UTT_1089), "--realtime", "--set", "stream.hwm=4",
                                  "--set", "stream.sndbuf=4096", "--wait-subscribers", "1")  # fmt: skip
    started = time.monotonic()
    with Subscriber(endpoint, kinds=("c", "scores"), hwm=4, rcvbuf=4096) as sub:
        sub.wait_meta(timeout=30)
        slow_until = time.monotonic() + 1.5
        while True:
            msg = sub.recv(timeout=0.5)
            if msg is None and proc.poll() is not None:
                break
            if time.monotonic() < slow_until:
                time.sleep(0.1)  # ten times too slow for 25 messages a second, then catching up
        took = time.monotonic() - started
        lost = sub.lost
    assert proc.returncode == 0
    assert took < duration + 3.0, f"daemon needed {took:.1f} s for {duration:.1f} s of audio"
    assert lost > 0 and sub.gaps, "the subscriber must see the messages it missed"


def test_curve_without_the_key_gets_nothing_with_it_everything(small_onnx, tmp_path):
    path, _ = small_onnx
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    keys.mkdir()
    zmq.auth.create_certificates(str(keys), "server")
    zmq.auth.create_certificates(str(keys), "client")
    zmq.auth.create_certificates(str(keys), "stranger")
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    proc, endpoint = start_daemon(
        path, "--file", str(UTT_1089), "--realtime", "--wait-subscribers", "1",
        "--set", f"stream.curve_secret_key={keys / 'server.key_secret'}", "--set", f"stream.curve_allowed_keys={allowed}",
    )  # fmt: skip
    plain = Subscriber(endpoint, kinds=("c",))
    stranger = Subscriber(
        endpoint,
        kinds=("c",),
        server_key=str(keys / "server.key"),
        client_key=str(keys / "stranger.key_secret"),
    )
    with Subscriber(
        endpoint,
        kinds=("c",),
        server_key=str(keys / "server.key"),
        client_key=str(keys / "client.key_secret"),
    ) as sub:
        sub.wait_meta(timeout=30)
        got, eos = collect(sub, 1)
    assert proc.wait(timeout=30) == 0
    assert len(frames_of(got["1089-134686-0001"]["c"])) == eos["1089-134686-0001"]["frames"] > 0
    for other in (plain, stranger):
        assert other.recv(timeout=0.5) is None and other.meta is None
        other.close()


def test_sigterm_mid_file_ends_the_stream_cleanly(small_onnx):
    path, _ = small_onnx
    proc, endpoint = start_daemon(path, "--file", str(UTT_2911), "--realtime", "--wait-subscribers", "1")
    with Subscriber(endpoint, kinds=("c",)) as sub:
        sub.wait_meta(timeout=30)
        first = sub.recv(timeout=10)
        assert first is not None and first.kind == "c"
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        got, eos = collect(sub, 1, timeout=15)
        assert sub.gaps == []
    assert proc.wait(timeout=15) == 0
    name = "2911-12359-0007"
    assert eos[name]["reason"] == "stopped"
    total = sf.info(str(UTT_2911)).frames // 160
    assert 0 < eos[name]["frames"] < total
    assert len(frames_of(got[name]["c"])) + first.header["count"] == eos[name]["frames"]


def test_late_joiner_gets_metadata_at_once_and_stats_report_the_daemon(small_onnx):
    path, _ = small_onnx
    proc, endpoint = start_daemon(path, "--file", str(UTT_2911), "--realtime", "--publish-z",
                                  "--set", "stream.meta_interval=600", "--set", "stream.stats_interval=0.5")  # fmt: skip
    try:
        time.sleep(2.0)  # join late: the only periodic metadata went out long ago
        with Subscriber(endpoint, kinds=("z",), stats=True) as sub:
            t = time.monotonic()
            meta = sub.wait_meta(timeout=5)
            assert time.monotonic() - t < 1.0 and meta["kinds"] == ["c", "scores", "z"]
            stats, z = None, None
            while stats is None or z is None:
                msg = sub.recv(timeout=5)
                assert msg is not None
                if msg.kind == "stats":
                    stats = msg.header
                elif msg.kind == "z":
                    z = msg
        assert z.data.shape == (4, 64) and z.header["frame"] > 0
        s = stats["streams"]["2911-12359-0007"]
        assert s["frames"] > 100 and s["dropped_s"] == 0 and s["queued_s"] < 1.0
        assert stats["rtf"] is not None and 0 < stats["rtf"] < 1 and stats["subscribers"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0


def run_cli(*args, timeout=60):
    r = subprocess.run(
        [sys.executable, "-m", "cpc_stream.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r.returncode, r.stderr.strip()


def test_bad_input_is_a_one_line_error(small_onnx, tmp_path):
    path, _ = small_onnx
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"nope")
    ctx = zmq.Context()
    taken = ctx.socket(zmq.PUB)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    cases = [
        (["--model", str(garbage), "--file", str(UTT_1089)], "garbage.onnx is not a loadable ONNX graph"),
        (
            ["--model", str(path), "--file", "/no/such.wav"],
            "cannot read audio file /no/such.wav: no such file",
        ),
        (
            ["--model", str(path), "--file", str(UTT_1089), "--bind", f"tcp://127.0.0.1:{port}"],
            "Address already in use",
        ),
        (
            ["--model", str(path), "--file", str(UTT_1089), "--set", "stream.hwm=0"],
            "config key stream.hwm: must be > 0",
        ),
        (
            ["--model", str(path), "--file", str(UTT_1089), "--set", "stream.hwn=3"],
            "unknown config key 'stream.hwn'",
        ),
        (
            ["--model", str(path), "--mic", "no-such-device-xyz"],
            "audio input device 'no-such-device-xyz' not found",
        ),
        (["--model", str(path)], "no source"),
        (
            ["--model", str(tmp_path / "none.onnx"), "--file", str(UTT_1089)],
            "model file .*none.onnx not found",
        ),
    ]
    try:
        for args, message in cases:
            code, err = run_cli(*args)
            assert code == 2 and len(err.splitlines()) == 1, (args, err)
            assert err.startswith("cpc-stream: error: "), err
            import re

            assert re.search(message, err), (message, err)
    finally:
        taken.close(0)
        ctx.term()


def test_listen_records_what_it_receives(small_onnx, tmp_path):
    path, model = small_onnx
    port = free_port()
    out = tmp_path / "rec.npz"
    listen = subprocess.Popen([sys.executable, "-m", "cpc_stream.listen", "--connect", f"tcp://127.0.0.1:{port}",
                               "--record", str(out), "--until-eos"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc, _ = start_daemon(path, "--file", str(UTT_1089), "--wait-subscribers", "1", port=port)
    assert proc.wait(timeout=60) == 0
    assert listen.wait(timeout=30) == 0, listen.stderr.read().decode()
    rec = np.load(out)
    ref = extract(model, load_audio(UTT_1089, 16000), 16)
    c = rec["1089-134686-0001.c"]
    assert c.shape == ref["c"].shape and np.abs(c - ref["c"]).max() < 1e-4
    assert rec["1089-134686-0001.frame_index"].tolist() == list(range(len(c)))
    assert "0 gaps, 0 messages lost" in listen.stderr.read().decode()


def _pulse_available() -> str:
    from shutil import which

    if not (which("pulseaudio") and which("pactl") and which("paplay")):
        return "PulseAudio is not installed (CI installs it: see .ci/run)"
    return ""


@pytest.mark.skipif(bool(_pulse_available()), reason=_pulse_available() or "pulse")
def test_mic_on_a_virtual_microphone(small_onnx, tmp_path):
    """Speech played into a PulseAudio null sink arrives at the subscriber as frames of the mic stream."""
    path, _ = small_onnx
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "pa")}
    subprocess.run(
        ["bash", str(REPO / "scripts/virtual-mic.sh"), "start"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        port = free_port()
        cmd = [sys.executable, "-m", "cpc_stream.cli", "--model", str(path), "--bind", f"tcp://127.0.0.1:{port}",
               "--mic", "pulse", "--wait-subscribers", "1"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with Subscriber(f"tcp://127.0.0.1:{port}", kinds=("c",)) as sub:
            sub.wait_meta(timeout=30)
            wav = tmp_path / "speech.wav"
            sf.write(wav, load_audio(UTT_1089, 16000), 16000)
            subprocess.run(["paplay", "--device=vsink", str(wav)], env=env, check=True, timeout=60)
            frames = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and frames < 300:
                msg = sub.recv(timeout=1)
                if msg is not None and msg.kind == "c" and msg.stream == "mic":
                    frames += msg.header["count"]
            proc.send_signal(signal.SIGINT)
            _, eos = collect(sub, 1, timeout=15)
        assert proc.wait(timeout=15) == 0, proc.stderr.read().decode()
        assert frames >= 300, f"only {frames} frames from the microphone"
        assert eos["mic"]["reason"] == "stopped"
    finally:
        subprocess.run(
            ["bash", str(REPO / "scripts/virtual-mic.sh"), "stop"], env=env, capture_output=True, timeout=30
        )
