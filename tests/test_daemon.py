"""cpc-stream end to end over real ZeroMQ on loopback: files, stdin, several streams, slow subscribers,
late joiners, CURVE, signals with every source idle and busy, a daemon killed and restarted under a live
subscriber, and streams that fail without taking the others down."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from shutil import which

import numpy as np
import pytest
import soundfile as sf
import soxr
import zmq
from conftest import REPO, UTT_1089, UTT_2911, collect, frames_of, free_port, start_daemon
from cpc_training.features import extract

from cpc_stream import protocol
from cpc_stream.audio import load_audio
from cpc_stream.client import Subscriber
from cpc_stream.security import write_key_pair


def start_listen(port: int, *args: str) -> subprocess.Popen:
    """cpc-listen on the daemon at `port`, as a user runs it."""
    cmd = [sys.executable, "-m", "cpc_stream.listen", "--connect", f"tcp://127.0.0.1:{port}", *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout=30) -> tuple[int, str]:
    """Wait for a daemon; its exit code and stderr."""
    if proc.stdin:
        proc.stdin.close()
        proc.stdin = None
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"daemon did not exit within {timeout} s: {err.decode()}") from None
    return proc.returncode, err.decode()


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
        assert sub.gaps == [] and sub.restarts == [] and not sub.malformed
    code, err = finish(proc)
    assert code == 0, err
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
        assert eos[name]["reason"] == "end of file" and eos[name]["last_seq"]["z"] == -1
        assert eos[name]["dropped_s"] == pytest.approx((len(wav) % 160) / 16000, abs=1e-4)
        stamps = [m.header["t_mono"] for m in got[name]["c"]]
        assert stamps == sorted(stamps), "t_mono went backwards for a file read at full speed"


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
    assert finish(proc)[0] == 0
    c = frames_of(got["stdin"]["c"])
    assert len(c) == len(wav) // 160
    ref = extract(model, pcm.astype(np.float32) / 32768, 16)["c"]
    assert np.abs(c - ref).max() < 1e-4
    assert "1 trailing bytes of a partial sample dropped" in eos["stdin"]["reason"]


def test_slow_subscriber_sees_gaps_and_never_slows_the_daemon(small_onnx):
    path, _ = small_onnx
    duration = sf.info(str(UTT_1089)).duration
    proc, endpoint = start_daemon(path, "--file", str(UTT_1089), "--realtime", "stream.hwm=4",
                                  "stream.sndbuf=4096", "--wait-subscribers", "1")  # fmt: skip
    with Subscriber(endpoint, kinds=("c", "scores"), hwm=4, rcvbuf=4096) as sub:
        sub.wait_meta(timeout=30)
        started = time.monotonic()  # the daemon starts its paced source now
        slow_until = time.monotonic() + 1.5
        while True:
            msg = sub.recv(timeout=0.5)
            if msg is None and proc.poll() is not None:
                break
            if time.monotonic() < slow_until:
                time.sleep(0.1)  # ten times too slow for 25 messages a second, then catching up
        took = time.monotonic() - started
        lost = sub.lost
    assert proc.wait(timeout=10) == 0
    assert took < duration + 3.0, f"daemon needed {took:.1f} s for {duration:.1f} s of audio"
    assert lost > 0 and sub.gaps, "the subscriber must see the messages it missed"


def test_curve_without_the_key_gets_nothing_with_it_everything(small_onnx, tmp_path):
    """Only a client whose public key is in the allowed folder receives anything; the daemon logs each
    rejected client once, with its address."""
    path, _ = small_onnx
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    keys.mkdir()
    for name in ("server", "client", "stranger"):
        write_key_pair(keys, name)
    assert (keys / "server.key_secret").stat().st_mode & 0o777 == 0o600
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    proc, endpoint = start_daemon(
        path, "--file", str(UTT_1089), "--realtime", "--wait-subscribers", "1",
        f"stream.curve_secret_key={keys / 'server.key_secret'}", f"stream.curve_allowed_keys={allowed}",
    )  # fmt: skip
    plain = Subscriber(endpoint, kinds=("c",))
    stranger = Subscriber(endpoint, kinds=("c",), server_key=str(keys / "server.key"),
                          client_key=str(keys / "stranger.key_secret"))  # fmt: skip
    with Subscriber(endpoint, kinds=("c",), server_key=str(keys / "server.key"),
                    client_key=str(keys / "client.key_secret")) as sub:  # fmt: skip
        sub.wait_meta(timeout=30)
        got, eos = collect(sub, 1)
    code, err = finish(proc)
    assert code == 0, err
    assert len(frames_of(got["1089-134686-0001"]["c"])) == eos["1089-134686-0001"]["frames"] > 0
    for other in (plain, stranger):
        assert other.recv(timeout=0.5) is None and other.meta is None
        other.close()
    rejected = [line for line in err.splitlines() if "rejected subscriber 127.0.0.1: Unknown key" in line]
    assert len(rejected) == 1, err  # once, though the stranger kept retrying


def test_routable_bind_needs_curve_or_insecure(small_onnx):
    """Publishing to the network in clear is refused unless asked for, and then said in a warning."""
    path, _ = small_onnx
    port = free_port()
    refused = subprocess.run([sys.executable, "-m", "cpc_stream.cli", "--model", str(path), "--file", str(UTT_1089),
                              "--bind", f"tcp://0.0.0.0:{port}"], cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "reachable from other machines and CURVE is off" in refused.stderr
    proc, _ = start_daemon(path, "--file", str(UTT_1089), "--insecure", "--bind", f"tcp://0.0.0.0:{port}")
    code, err = finish(proc)
    assert code == 0 and "warning: publishing on tcp://0.0.0.0" in err and "without CURVE" in err


# -- stopping: every source kind, idle and busy --------------------------------------------------------
def long_wav(tmp_path, seconds: float = 600.0):
    wav = load_audio(UTT_2911, 16000)
    path = tmp_path / "long.wav"
    sf.write(path, np.resize(wav, int(seconds * 16000)), 16000)
    return path


STOPS = {
    # source kind and state: (daemon arguments, what feeds it)
    "file-busy": (["--file", "{long}"], None),  # read as fast as possible (10 min: still busy at the signal)
    "file-paced": (["--file", "{long}", "--realtime"], None),  # waits between 10 ms blocks
    "stdin-idle": (["--stdin"], "idle"),  # the pipe is open and nothing comes
    "stdin-busy": (["--stdin"], "busy"),
}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("kind", list(STOPS))
def test_a_signal_stops_every_source_kind_within_a_bounded_time(small_onnx, tmp_path, kind, signum):
    """Whatever a source is blocked in, a signal ends its stream with eos 'stopped' and the daemon
    exits 0 within a few seconds (the README's promise: drain, eos, exit)."""
    path, _ = small_onnx
    args, feed = STOPS[kind]
    if "{long}" in args:
        args = [a.format(long=long_wav(tmp_path)) for a in args]
    proc, endpoint = start_daemon(path, *args, "--wait-subscribers", "1")
    with Subscriber(endpoint, kinds=("c",)) as sub:
        sub.wait_meta(timeout=30)
        if feed == "busy":
            proc.stdin.write(
                (np.random.default_rng(0).standard_normal(16000 * 2) * 3000).astype("<i2").tobytes()
            )
            proc.stdin.flush()
        time.sleep(1.0)
        proc.send_signal(signum)
        t0 = time.monotonic()
        _, eos = collect(sub, 1, timeout=20)
        code, err = finish(proc, timeout=20)  # a source that ignored the signal would hang here
        took = time.monotonic() - t0
    assert code == 0, err
    (name,) = eos
    assert eos[name]["reason"] == "stopped", eos
    assert took < 20.0, f"{kind}: stopped after {took:.1f} s"  # grace 5 s + draining, on a loaded machine
    if feed == "busy" or kind.startswith("file"):
        assert eos[name]["frames"] > 0


def test_a_second_signal_ends_every_stream_at_once(small_onnx):
    """A second signal does not wait for the sources or the buffered audio: every stream ends at once,
    its eos still published, and the daemon exits 0."""
    path, _ = small_onnx
    proc, endpoint = start_daemon(path, "--stdin", "--wait-subscribers", "1")
    with Subscriber(endpoint, kinds=("c",)) as sub:
        sub.wait_meta(timeout=30)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
        _, eos = collect(sub, 1, timeout=10)
    assert finish(proc, timeout=10)[0] == 0
    assert eos["stdin"]["reason"] == "stopped"


# -- one stream's failure is its own ------------------------------------------------------------------
def test_a_non_ascii_name_and_a_damaged_file_end_only_their_own_stream(small_onnx, tmp_path):
    """Stream names are any UTF-8 (a file name that is not UTF-8 gets U+FFFD for its bad bytes); a
    truncated FLAC publishes every hop that still decodes and ends
    with eos 'error: ...' while the other streams finish normally; the daemon then exits 1."""
    path, model = small_onnx
    accented = tmp_path / "réunion été.wav"
    sf.write(accented, load_audio(UTT_1089, 16000), 16000)
    damaged = tmp_path / "damaged.flac"
    data = UTT_2911.read_bytes()
    damaged.write_bytes(data[: len(data) * 2 // 3])
    not_utf8 = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.flac")  # a Latin-1 name: not UTF-8
    Path(not_utf8).write_bytes(UTT_1089.read_bytes())
    proc, endpoint = start_daemon(path, "--file", str(accented), "--file", str(damaged), "--file", str(UTT_1089),
                                  "--file", not_utf8, "--wait-subscribers", "1")  # fmt: skip
    with Subscriber(endpoint, kinds=("c",)) as sub:
        meta = sub.wait_meta(timeout=30)
        got, eos = collect(sub, 4)
    code, err = finish(proc)
    assert code == 1, err
    assert meta["streams"] == ["réunion été-0", "damaged-1", "1089-134686-0001-2", "caf\ufffd-3"]
    for name in ("réunion été-0", "1089-134686-0001-2", "caf\ufffd-3"):
        assert eos[name]["reason"] == "end of file"
        assert len(frames_of(got[name]["c"])) == len(load_audio(UTT_1089, 16000)) // 160
    assert eos["damaged-1"]["reason"].startswith("error: ") and "damaged after" in eos["damaged-1"]["reason"]
    decodable = 53232  # samples soundfile still decodes from this cut (16-sample reads), 3.33 s
    assert decodable // 160 - 1 <= eos["damaged-1"]["frames"] <= decodable // 160
    assert "error: stream damaged-1 ended" in err


def test_nan_and_inf_input_is_replaced_counted_and_warned(small_onnx, tmp_path):
    """Non-finite samples become 0 (the one policy, also cpc-features'): frames stay finite and equal
    the features of the zeroed audio; stats and eos count them; stderr warns once."""
    path, model = small_onnx
    wav = load_audio(UTT_1089, 16000)
    bad = wav.copy()
    bad[[1000, 5000, 5001]] = [np.nan, np.inf, -np.inf]
    src = tmp_path / "nan.wav"
    sf.write(src, bad, 16000, subtype="FLOAT")
    proc, endpoint = start_daemon(path, "--file", str(src), "--wait-subscribers", "1")
    with Subscriber(endpoint, kinds=("c",)) as sub:
        sub.wait_meta(timeout=30)
        got, eos = collect(sub, 1)
    code, err = finish(proc)
    assert code == 0, err
    c = frames_of(got["nan"]["c"])
    clean = bad.copy()
    clean[~np.isfinite(clean)] = 0
    assert np.isfinite(c).all() and np.abs(c - extract(model, clean, 16)["c"]).max() < 1e-4
    assert eos["nan"]["nonfinite"] == 3
    assert err.count("NaN or Inf") == 1 and "3 non-finite input samples replaced with 0" in err


# -- subscribers: late joiners, counting, exact topics ---------------------------------------------------
def test_late_joiner_gets_metadata_at_once_and_stats_report_the_daemon(small_onnx):
    path, _ = small_onnx
    proc, endpoint = start_daemon(path, "--file", str(UTT_2911), "--realtime", "--publish-z",
                                  "stream.meta_interval=600", "stream.stats_interval=0.5")  # fmt: skip
    try:
        time.sleep(2.0)  # join late: the only periodic metadata went out long ago
        with Subscriber(endpoint, kinds=("z",), stats=True) as sub:
            t = time.monotonic()
            meta = sub.wait_meta(timeout=5)
            assert time.monotonic() - t < 1.0 and meta["kinds"] == ["c", "scores", "z"]
            stats, z = None, None
            deadline = time.monotonic() + 20
            # Wait for a stats message that has seen real work, whatever the machine's speed.
            while (
                stats is None or stats["streams"]["2911-12359-0007"]["frames"] < 100 or z is None
            ) and time.monotonic() < deadline:
                msg = sub.recv(timeout=5)
                assert msg is not None
                if msg.kind == "stats" and msg.header["rtf"] is not None:
                    stats = msg.header
                elif msg.kind == "z":
                    z = msg
        assert z.data.shape == (4, 64) and z.header["frame"] > 0
        s = stats["streams"]["2911-12359-0007"]
        assert s["frames"] >= 100 and s["dropped_s"] == 0 and s["queued_s"] < 1.0 and s["nonfinite"] == 0
        assert 0 < stats["rtf"] < 1 and stats["subscribers"] >= 1 and stats["instance"] == meta["instance"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0


def test_a_joiner_gets_metadata_alone_and_wait_subscribers_counts_sockets(small_onnx):
    """--wait-subscribers 2: one raw socket subscribing to both "" and "meta." counts once, so the daemon
    waits; a second subscriber (whose prefix "meta" lacks the dot) starts it. Each of 30 joiners gets
    its metadata at once, and a subscriber already there gets none of their copies."""
    path, _ = small_onnx
    proc, endpoint = start_daemon(
        path, "--file", str(UTT_1089), "--wait-subscribers", "2", "stream.meta_interval=600"
    )
    ctx = zmq.Context()
    try:
        first = ctx.socket(zmq.SUB)
        first.connect(endpoint)
        first.subscribe(b"")
        first.subscribe(b"meta.")
        metas = 0
        deadline = time.monotonic() + 30
        while metas < 2 and time.monotonic() < deadline:  # one answer per subscription
            if first.poll(500):
                metas += protocol.decode(first.recv_multipart()).kind == "meta"
        assert metas == 2
        assert not first.poll(1000), "the daemon started with one subscriber counted twice"
        joiners = []
        for _ in range(30):
            s = ctx.socket(zmq.SUB)
            s.connect(endpoint)
            s.subscribe(b"meta")
            joiners.append(s)
        for s in joiners:
            assert s.poll(10000) and protocol.decode(s.recv_multipart()).kind == "meta"
        seen = []
        while first.poll(3000):
            msg = protocol.decode(first.recv_multipart())
            seen.append(msg.kind)
            if msg.kind == "eos":
                break
        assert "c" in seen and "eos" in seen  # the daemon started
        assert "meta" not in seen, "a joiner's metadata reached an earlier subscriber"
        for s in [first, *joiners]:
            s.close(0)
    finally:
        ctx.term()
        finish(proc)


def test_listen_records_one_stream_exactly_and_waits_for_a_stream_without_frames(small_onnx, tmp_path):
    """cpc-listen --stream bit24-1 takes bit24-1 alone, not bit24-10 (exact topics); --until-eos waits for
    every stream of the daemon, not just the first to end (here an empty one)."""
    path, model = small_onnx
    src = tmp_path / "bit24.wav"
    wav = load_audio(UTT_1089, 16000)[:16000]
    sf.write(src, wav, 16000, subtype="PCM_24")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(100, np.float32), 16000)
    port = free_port()
    out = tmp_path / "rec.npz"
    listen = start_listen(
        port, "--record", str(out), "--until-eos", "--quiet", "--stream", "bit24-1", "--stream", "empty-11"
    )
    files = [a for _ in range(11) for a in ("--file", str(src))]
    proc, _ = start_daemon(path, *files, "--file", str(empty), "--wait-subscribers", "1", port=port)
    assert finish(proc)[0] == 0
    _, err = listen.communicate(timeout=30)
    assert listen.returncode == 0, err.decode()
    rec = np.load(out)
    assert sorted(k for k in rec.keys() if "." in k) == ["bit24-1.c", "bit24-1.frame_index", "bit24-1.scores"]
    ref = extract(model, load_audio(src, 16000), 16)["c"]
    assert np.abs(rec["bit24-1.c"] - ref).max() < 1e-4
    runs = json.loads(str(rec["runs"]))
    assert [(r["key"], r["frames"], r["lost"]) for r in runs] == [("bit24-1", 100, 0)]


def test_listen_records_what_it_receives(small_onnx, tmp_path):
    path, model = small_onnx
    port = free_port()
    out = tmp_path / "rec.npz"
    listen = start_listen(port, "--record", str(out), "--until-eos")
    proc, _ = start_daemon(path, "--file", str(UTT_1089), "--wait-subscribers", "1", port=port)
    assert finish(proc)[0] == 0
    _, err = listen.communicate(timeout=30)
    assert listen.returncode == 0, err.decode()
    rec = np.load(out)
    ref = extract(model, load_audio(UTT_1089, 16000), 16)
    c = rec["1089-134686-0001.c"]
    assert c.shape == ref["c"].shape and np.abs(c - ref["c"]).max() < 1e-4
    assert rec["1089-134686-0001.frame_index"].tolist() == list(range(len(c)))
    assert "0 gaps, 0 messages lost" in err.decode()


# -- a daemon killed and restarted under a live subscriber ----------------------------------------------
def test_a_killed_and_restarted_daemon_is_a_restart_not_a_merge(small_onnx, tmp_path):
    """kill -9 mid-stream, then a new daemon under the same name and port: cpc-listen keeps the two runs
    apart (no duplicate frame indices, the second run complete), reports the restart, and ends on the
    second run's eos."""
    path, _ = small_onnx
    port = free_port()
    out = tmp_path / "rec.npz"
    listen = start_listen(port, "--record", str(out), "--until-eos", "--quiet", "--silence", "20")
    first, endpoint = start_daemon(
        path, "--file", str(UTT_2911), "--realtime", "--wait-subscribers", "1", port=port
    )
    with Subscriber(endpoint, kinds=("c",)) as watch:  # our own view, to know when frames flow
        watch.wait_meta(timeout=30)
        assert watch.recv(timeout=10) is not None
        time.sleep(1.0)
        first.kill()
        first.wait()
        second, _ = start_daemon(path, "--file", str(UTT_2911), "--wait-subscribers", "2", port=port)
        while (msg := watch.recv(timeout=20)) is not None and not (msg.kind == "eos" and watch.restarts):
            pass
        assert finish(second)[0] == 0
        assert len(watch.restarts) == 1 and watch.restarts[0][1][0] != watch.restarts[0][2][0]
    _, err = listen.communicate(timeout=30)
    err = err.decode()
    assert listen.returncode == 0, err
    rec = np.load(out)
    runs = {r["key"]: r for r in json.loads(str(rec["runs"]))}
    name = "2911-12359-0007"
    assert set(runs) == {name, f"{name}@1"} and runs[name]["instance"] != runs[f"{name}@1"]["instance"]
    assert (runs[name]["ended"], runs[f"{name}@1"]["ended"]) == (None, "end of file")  # killed: no eos
    total = sf.info(str(UTT_2911)).frames // 160
    assert 0 < len(rec[f"{name}.c"]) < total and len(rec[f"{name}@1.c"]) == total
    for key in (name, f"{name}@1"):
        idx = rec[f"{key}.frame_index"]
        assert idx.tolist() == list(range(len(idx)))  # each run whole and in order, nothing merged
    assert (
        "1 restarts (recorded as separate runs)" in err and f"{name}: " in err and "(no end of stream)" in err
    )


def test_listen_gives_up_on_a_silent_daemon_and_keeps_what_arrived(small_onnx, tmp_path):
    path, _ = small_onnx
    port = free_port()
    out = tmp_path / "rec.npz"
    listen = start_listen(port, "--record", str(out), "--until-eos", "--quiet", "--silence", "2")
    proc, _ = start_daemon(path, "--file", str(UTT_2911), "--realtime", "--wait-subscribers", "1", port=port)
    time.sleep(3.0)
    proc.kill()
    proc.wait()
    _, err = listen.communicate(timeout=30)
    assert listen.returncode == 1 and "has been silent for 2 s" in err.decode()
    assert len(np.load(out)["2911-12359-0007.c"]) > 0


def _pulse_available() -> str:
    """'' when the virtual microphone can run, else which Debian packages are missing."""
    from glob import glob

    def portaudio() -> bool:
        try:
            import sounddevice  # noqa: F401
        except OSError:
            return False
        return True

    missing = [
        package
        for package, there in [
            ("libportaudio2", portaudio()),
            ("pulseaudio", which("pulseaudio")),
            ("pulseaudio-utils", which("pactl") and which("paplay") and which("pacat")),
            ("libasound2-plugins", glob("/usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so")),
        ]
        if not there
    ]
    if missing:
        return f"needs {' '.join(missing)} (bash scripts/test.sh installs them as root or through sudo)"
    return ""


@pytest.fixture
def virtual_mic(tmp_path):
    reason = _pulse_available()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "pa")}
    subprocess.run(["bash", str(REPO / "scripts/virtual-mic.sh"), "start"], env=env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    yield env
    subprocess.run(
        ["bash", str(REPO / "scripts/virtual-mic.sh"), "stop"], env=env, capture_output=True, timeout=30
    )


def test_mic_on_a_virtual_microphone(small_onnx, tmp_path, virtual_mic):
    """Speech played into a PulseAudio null sink arrives at the subscriber as frames of the mic stream."""
    path, _ = small_onnx
    proc, endpoint = start_daemon(path, "--mic", "pulse", "--wait-subscribers", "1", env=virtual_mic)
    with Subscriber(endpoint, kinds=("c",)) as sub:
        sub.wait_meta(timeout=30)
        wav = tmp_path / "speech.wav"
        sf.write(wav, load_audio(UTT_1089, 16000), 16000)
        subprocess.run(["paplay", "--device=vsink", str(wav)], env=virtual_mic, check=True, timeout=60)
        frames = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and frames < 300:
            msg = sub.recv(timeout=1)
            if msg is not None and msg.kind == "c" and msg.stream == "mic":
                frames += msg.header["count"]
        proc.send_signal(signal.SIGINT)
        _, eos = collect(sub, 1, timeout=15)
    code, err = finish(proc, timeout=15)
    assert code == 0, err
    assert frames >= 300, f"only {frames} frames from the microphone"
    assert eos["mic"]["reason"] == "stopped"


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_a_signal_stops_the_microphone_idle_or_busy(small_onnx, tmp_path, virtual_mic, busy):
    path, _ = small_onnx
    proc, endpoint = start_daemon(path, "--mic", "pulse", "--wait-subscribers", "1", env=virtual_mic)
    player = None
    with Subscriber(endpoint, kinds=("c",)) as sub:
        sub.wait_meta(timeout=30)
        if busy:
            wav = tmp_path / "speech.wav"
            sf.write(wav, load_audio(UTT_2911, 16000), 16000)
            player = subprocess.Popen(["paplay", "--device=vsink", str(wav)], env=virtual_mic)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, eos = collect(sub, 1, timeout=20)
        code, err = finish(proc, timeout=20)
    if player:
        player.kill()
    assert code == 0, err
    assert eos["mic"]["reason"] == "stopped" and time.monotonic() - t0 < 20.0


def test_cpc_listen_skips_malformed_messages_and_keeps_recording(tmp_path):
    """A publisher that mixes garbage (wrong frame counts, bad JSON, shapes that do not fit, NaN, a
    version 1 message, a payload too big) with valid frames: cpc-listen records every valid frame, counts
    the rest, and exits 0 with its recording."""
    import zmq

    from cpc_stream import protocol

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    out = tmp_path / "rec.npz"
    listen = start_listen(port, "--record", str(out), "--quiet", "--duration", "4")
    meta = {"instance": "i" * 16, "model": {"sample_rate": 16000, "hop": 160, "frames_per_call": 1, "enc_dim": 3,
            "ctx_dim": 2, "n_steps": 2}, "streams": ["s"], "epochs": {"s": 0}, "kinds": ["c"],
            "meta_interval": 1.0, "stats_interval": 1.0}  # fmt: skip
    head = {"instance": "i" * 16, "epoch": 0, "count": 1, "t_mono": 1.0, "t_wall": 2.0}
    garbage = [
        [b"c.s\0", b"{}"],
        [b"c.s\0", b"{not json", b""],
        protocol.encode(
            "c", "s", {**head, "seq": 50, "frame": 50}, np.zeros((1, 7), np.float32)
        ),  # not ctx_dim
        protocol.encode("c", "s", {**head, "seq": 51, "frame": 51}, np.array([[np.nan, 0]], np.float32)),
        [b"c.s", b'{"v":1,"kind":"c","stream":"s"}', b""],
        [b"c.s\0", b'{"v":2,"kind":"c","stream":"s","dtype":"<f4","shape":[1,1073741824]}', b""],
    ]
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # until cpc-listen has subscribed, the metadata is its heartbeat
            pub.send_multipart(protocol.encode("meta", "", meta))
            time.sleep(0.1)
        for seq in range(6):
            pub.send_multipart(
                protocol.encode(
                    "c", "s", {**head, "seq": seq, "frame": seq}, np.full((1, 2), seq, np.float32)
                )
            )
            for frames in garbage:
                pub.send_multipart(frames)
        _, err = listen.communicate(timeout=30)
    finally:
        pub.close(0)
        ctx.term()
    err = err.decode()
    assert listen.returncode == 0, err
    rec = np.load(out)
    assert rec["s.c"][:, 0].tolist() == [0, 1, 2, 3, 4, 5] and rec["s.frame_index"].tolist() == list(range(6))
    assert "0 gaps, 0 messages lost; 36 malformed messages skipped" in err, err


def test_cpc_listen_says_when_nothing_came(tmp_path):
    """No daemon (or one that refuses this client): cpc-listen says so and exits 1, rather than a quiet
    'nothing received'."""
    listen = start_listen(free_port(), "--duration", "1.5", "--quiet")
    _, err = listen.communicate(timeout=30)
    assert listen.returncode == 1 and "error: nothing came from tcp://127.0.0.1:" in err.decode()
