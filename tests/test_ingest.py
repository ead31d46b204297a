"""Audio in over the network (cpc-stream --listen, cpc-send): many clients in one batch, streams that
join and leave without disturbing each other, reset, limits and bad input, each refused with a close code
and a reason, metrics. Loopback only; every wait is bounded."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf
import soxr
from conftest import MINI, REPO, UTT_1089, UTT_2911, collect, frames_of, free_port, start_daemon
from cpc_training.features import extract
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cpc_stream.audio import load_audio
from cpc_stream.client import IngestError, Subscriber, send_audio

FILES = sorted(MINI.glob("*/*/*/*.flac"))


@contextlib.contextmanager
def ingest_daemon(model, *args, max_streams=32):
    """A daemon with --listen on a free loopback port; yields (process, ws url, zmq endpoint, metrics url)."""
    port, metrics_port = free_port(), free_port()
    proc, endpoint = start_daemon(model, "--listen", f"127.0.0.1:{port}", "--max-streams", str(max_streams),
                                  "--metrics", f"127.0.0.1:{metrics_port}", *args)  # fmt: skip
    url = f"ws://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:  # the ingest port answers /healthz once the daemon is up
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
            time.sleep(0.1)
    try:
        yield proc, url, endpoint, f"http://127.0.0.1:{metrics_port}"
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.stdin.close()
        proc.stdin = None
        proc.communicate(timeout=30)


def blocks(wav: np.ndarray, size: int) -> list[np.ndarray]:
    """(samples,) or (samples, channels) -> messages of `size` frames, (frames, channels) each."""
    wav = wav.reshape(len(wav), -1)
    return [wav[i : i + size] for i in range(0, len(wav), size)]


def variants(tmp_path):
    """The bundled utterances as clients would send them: 16 kHz mono, 8 kHz, 44.1 kHz stereo, 48 kHz stereo.
    Returns [(name, samples (n, channels) float32 exactly as sent in int16, rate)]."""
    out = []
    for i, f in enumerate(FILES):
        wav, sr = sf.read(str(f), dtype="float32")
        rate, channels = ((16000, 1), (8000, 1), (44100, 2), (48000, 2))[i % 4]
        x = soxr.resample(wav, sr, rate) if rate != sr else wav
        x = np.stack([x, 0.5 * x], axis=1) if channels == 2 else x[:, None]
        x = np.clip(np.round(x * 32768), -32768, 32767).astype(np.float32) / 32768  # what int16 carries
        out.append((f"{f.stem}@{rate}x{channels}", x, rate))
    return out


def offline(model, x: np.ndarray, rate: int, tmp_path) -> dict[str, np.ndarray]:
    """cpc-features' reference for what a client sent: the same samples through load_audio."""
    path = tmp_path / f"ref-{rate}-{x.shape[1]}-{len(x)}.wav"
    sf.write(path, x, rate, subtype="FLOAT")
    return extract(model, load_audio(path, 16000), 16)


def test_32_clients_at_any_rate_stream_into_one_batch_equal_to_offline(small_onnx, tmp_path):
    """32 concurrent WebSocket clients (the bundled speech at 8, 16, 44.1 and 48 kHz, mono and stereo)
    feed one daemon; a ZeroMQ subscriber receives every stream whole, each equal to cpc-features."""
    path, model = small_onnx
    sent = variants(tmp_path)
    clients = [(f"{name}-{k}", x, rate) for k in range(3) for name, x, rate in sent][:32]
    with ingest_daemon(path) as (_, url, endpoint, _):
        with Subscriber(endpoint, kinds=("c",)) as sub:
            sub.wait_meta(timeout=10)
            errors = []

            def client(name, x, rate):
                try:
                    send_audio(url, blocks(x, rate // 50), rate, x.shape[1], name, realtime=False)
                except IngestError as e:
                    errors.append(e)

            threads = [threading.Thread(target=client, args=c) for c in clients]
            for t in threads:
                t.start()
            got, eos = collect(sub, len(clients), timeout=120)
            for t in threads:
                t.join(timeout=60)
            assert not errors and sub.gaps == [] and not sub.malformed
    assert len(eos) == 32 and all(e["reason"] == "end of input" for e in eos.values())
    refs = {}
    for name, x, rate in clients:
        key = name.rsplit("-", 1)[0]
        refs[key] = refs.get(key) or offline(model, x, rate, tmp_path)
        c = frames_of(got[name]["c"])
        assert c.shape == refs[key]["c"].shape == (eos[name]["frames"], 32), name
        assert np.abs(c - refs[key]["c"]).max() < 1e-4, name


def stream_alone_and_among_others(path, tmp_path, others: bool) -> np.ndarray:
    """c of stream "a" (UTT_2911, sent in 20 ms messages at once), while other streams join and leave
    (others=True) or alone."""
    wav = load_audio(UTT_2911, 16000)
    with ingest_daemon(path, "stream.max_wait_ms=0") as (_, url, endpoint, _):
        with Subscriber(endpoint, kinds=("c",), streams=["a"]) as sub:
            sub.wait_meta(timeout=10)
            if others:

                def churn(prefix: str) -> None:
                    for k in range(6):
                        w = load_audio(FILES[k], 16000)[: 16000 * (1 + k % 3)]
                        send_audio(url, blocks(w, 160 * (1 + k)), 16000, 1, f"{prefix}{k}", realtime=False)

                threads = [threading.Thread(target=churn, args=(p,)) for p in ("o", "p")]
                for t in threads:
                    t.start()
            send_audio(url, blocks(wav, 320), 16000, 1, "a", realtime=False)
            got, _ = collect(sub, 1, timeout=60)
            if others:
                for t in threads:
                    t.join(timeout=60)
    return frames_of(got["a"]["c"])


def test_a_streams_frames_do_not_depend_on_who_joins_and_leaves(small_onnx, tmp_path):
    """Bit for bit: stream a's c_t alone equals its c_t while 12 other streams join and leave the batch
    (rows taken and freed, calls of every size)."""
    path, _ = small_onnx
    alone = stream_alone_and_among_others(path, tmp_path, others=False)
    crowded = stream_alone_and_among_others(path, tmp_path, others=True)
    assert alone.shape == crowded.shape and np.array_equal(alone, crowded)


def test_reset_starts_a_new_run_and_a_disconnect_ends_the_stream_with_its_reason(small_onnx, tmp_path):
    path, model = small_onnx
    wav = load_audio(UTT_1089, 16000)
    with ingest_daemon(path) as (_, url, endpoint, _):
        with Subscriber(endpoint, kinds=("c",)) as sub:
            sub.wait_meta(timeout=10)
            with connect(url) as ws:
                ws.send(
                    json.dumps(
                        {
                            "type": "hello",
                            "stream": "r",
                            "sample_rate": 16000,
                            "channels": 1,
                            "format": "float32",
                        }
                    )
                )
                first = json.loads(ws.recv(10))
                ws.send(wav[:16000].astype("<f4").tobytes())  # 1 s, then start over
                ws.send(json.dumps({"type": "reset"}))
                second = json.loads(ws.recv(10))
                for block in blocks(wav, 1600):
                    ws.send(block.astype("<f4").tobytes())
                ws.send(json.dumps({"type": "end"}))
                with pytest.raises(ConnectionClosed):
                    ws.recv(10)
            got, eos = [], []
            while len(eos) < 2 and (m := sub.recv(timeout=10)) is not None:
                (eos if m.kind == "eos" else got).append(m)
            with connect(url) as ws:  # a client that goes away without "end"
                ws.send(json.dumps({"type": "hello", "stream": "gone", "sample_rate": 16000}))
                ws.recv(10)
                ws.send((wav[:8000] * 32767).astype("<i2").tobytes())
            gone = None
            while gone is None and (m := sub.recv(timeout=10)) is not None:
                gone = m if m.kind == "eos" else None
    assert (first["epoch"], second["epoch"]) == (0, 1)
    assert [(e.header["epoch"], e.header["reason"], e.header["frames"]) for e in eos] == [
        (0, "reset", 100), (1, "end of input", len(wav) // 160)]  # fmt: skip
    run1 = np.concatenate([m.data for m in got if m.run[1] == 1])
    assert np.abs(run1 - extract(model, wav, 16)["c"]).max() < 1e-4  # the new run starts from zero state
    assert gone.stream == "gone" and gone.header["reason"].startswith("client disconnected without end")
    assert gone.header["frames"] == 50


def refusal(url: str, hello, *then: bytes | str) -> tuple[int, str]:
    """Connect, send `hello` (a dict, or raw text/bytes) and then `then`; the close code and reason."""
    with connect(url, max_size=None) as ws:
        ws.send(json.dumps(hello) if isinstance(hello, dict) else hello)
        try:
            for msg in then:
                if isinstance(hello, dict) and msg is then[0]:
                    json.loads(ws.recv(10))  # ready
                ws.send(msg)
            while True:
                ws.recv(10)
        except ConnectionClosed as e:
            return e.rcvd.code, e.rcvd.reason
    raise AssertionError("not closed")


HELLO = {
    "type": "hello",
    "stream": "x",
    "sample_rate": 16000,
    "channels": 2,
    "format": "int16",
    "token": "s3cret",
}
BAD = [
    ("not JSON", "hello?", (), 1008, "hello is not JSON"),
    ("audio first", b"\0\0", (), 1008, "the first message must be the JSON hello"),
    ("no type", {"stream": "x"}, (), 1008, '"type": "hello"'),
    ("bad rate", {**HELLO, "sample_rate": 16000.5}, (), 1008, "sample_rate '16000.5': expected an integer"),
    ("bad channels", {**HELLO, "channels": 0}, (), 1008, "channels '0': expected an integer from 1 to 8"),
    ("bad format", {**HELLO, "format": "int24"}, (), 1008, "format 'int24': expected one of int16, float32"),
    ("bad name", {**HELLO, "stream": ""}, (), 1008, "stream name '' is empty"),
    ("bad token", {**HELLO, "token": "guess"}, (), 1008, "bad or missing token"),
    ("odd bytes", HELLO, (b"\0" * 6,), 1007, "binary message of 6 bytes is not whole int16 frames of 2 channel(s)"),
    ("unknown command", HELLO, ('{"type": "pause"}',), 1008, 'text messages are {"type": "end"} or {"type": "reset"}'),
    ("oversized", HELLO, (b"\0" * 70000,), 1009, "exceeds limit"),
]  # fmt: skip


def test_every_bad_client_is_refused_with_a_reason_and_the_others_go_on(small_onnx, tmp_path):
    """Bad hellos, a bad token, odd byte counts, unknown commands, an oversized message, a hello that never
    comes, a duplicate name and one client too many: each gets its close code and reason; a good stream
    streaming meanwhile is whole and the daemon keeps serving."""
    path, model = small_onnx
    wav = load_audio(UTT_2911, 16000)
    with ingest_daemon(path, "stream.ingest_token=s3cret", "stream.max_message_bytes=65536",
                       "stream.hello_timeout=1", max_streams=2) as (proc, url, endpoint, _):  # fmt: skip
        with Subscriber(endpoint, kinds=("c",)) as sub:
            sub.wait_meta(timeout=10)
            good = threading.Thread(target=send_audio, args=(url, blocks(wav, 160), 16000, 1, "good"),
                                    kwargs={"paced": True, "token": "s3cret"})  # fmt: skip
            good.start()
            time.sleep(0.3)
            for name, hello, then, code, reason in BAD:
                got = refusal(url, hello, *then)
                assert got[0] == code and reason in got[1], (name, got)
            with connect(url) as ws:  # a hello that never comes
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(10)
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "no hello within 1 s")
            with connect(url) as ws:  # the one free row, held while we try a duplicate and a third stream
                ws.send(json.dumps({**HELLO, "stream": "holder"}))
                ws.recv(10)
                assert refusal(url, {**HELLO, "stream": "good"}) == (
                    1008,
                    "stream name 'good' is in use; choose another",
                )
                code, reason = refusal(url, {**HELLO, "stream": "third"})
                assert code == 1013 and "maximum of 2 network streams (--max-streams)" in reason
            good.join(timeout=30)
            got, eos = {}, {}
            deadline = time.monotonic() + 20
            while not {"good", "holder"} <= set(eos) and time.monotonic() < deadline:
                m = sub.recv(timeout=1)
                if m is not None and m.kind == "eos":
                    eos.setdefault(m.stream, []).append(m.header["reason"])
                elif m is not None:
                    got.setdefault(m.stream, []).append(m)
            assert proc.poll() is None
    assert eos["good"] == ["end of input"] and eos["holder"][0].startswith("client disconnected without end")
    # the streams refused after their hello had a row: each ended with its reason
    assert [r.split(":")[0] for r in eos["x"]] == ["error"] * 3
    c = frames_of(got["good"])
    assert np.abs(c - extract(model, wav, 16)["c"]).max() < 1e-4 and sub.gaps == []


def test_a_stalled_client_never_holds_the_others_back(small_onnx, tmp_path):
    """One client connects and sends nothing; another that floods faster than real time has what does
    not fit its buffer dropped and counted; a paced client meanwhile streams at real time, whole."""
    path, model = small_onnx
    wav = load_audio(UTT_1089, 16000)
    with ingest_daemon(path, "stream.queue_seconds=0.5") as (_, url, endpoint, _):
        with Subscriber(endpoint, kinds=("c",)) as sub:
            sub.wait_meta(timeout=10)
            with connect(url) as stalled:
                stalled.send(json.dumps({"type": "hello", "stream": "stalled", "sample_rate": 16000}))
                stalled.recv(10)
                flood = np.tile(wav, 3)
                send_audio(url, blocks(flood, 16000), 16000, 1, "flood")  # 10 s in one go, live
                start = time.monotonic()
                send_audio(url, blocks(wav, 160), 16000, 1, "paced", paced=True)
                took = time.monotonic() - start
                got, eos = collect(sub, 2, timeout=30)
    duration = len(wav) / 16000
    assert took < duration + 2.0, f"{took:.1f} s for {duration:.1f} s of audio"
    assert np.abs(frames_of(got["paced"]["c"]) - extract(model, wav, 16)["c"]).max() < 1e-4
    assert eos["flood"]["dropped_s"] > 1.0 and eos["paced"]["dropped_s"] < 0.01


def test_cpc_send_streams_a_file_end_to_end_and_metrics_count_it(small_onnx, tmp_path):
    """cpc-send a 44.1 kHz stereo file; the subscriber's c_t equals cpc-features'; /metrics then counts
    the stream and its frames, and /healthz says ok."""
    from prometheus_client.parser import text_string_to_metric_families

    path, model = small_onnx
    speech, sr = sf.read(str(UTT_1089), dtype="float32")
    stereo = tmp_path / "talk.wav"
    up = soxr.resample(speech, sr, 44100)
    sf.write(stereo, np.stack([up, 0.5 * up], axis=1), 44100, subtype="PCM_16")
    with ingest_daemon(path) as (_, url, endpoint, metrics):
        with Subscriber(endpoint, kinds=("c",)) as sub:
            sub.wait_meta(timeout=10)
            r = subprocess.run([sys.executable, "-m", "cpc_stream.send", "--url", url, "--fast", str(stereo)],
                               cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert "cpc-send: talk: sent" in r.stderr
            got, eos = collect(sub, 1, timeout=30)
            time.sleep(0.2)
            text = urllib.request.urlopen(metrics + "/metrics", timeout=5).read().decode()
            assert urllib.request.urlopen(metrics + "/healthz", timeout=5).read() == b"ok\n"
    ref = extract(model, load_audio(stereo, 16000), 16)["c"]
    assert np.abs(frames_of(got["talk"]["c"]) - ref).max() < 1e-4
    values = {s.name + json.dumps(s.labels, sort_keys=True): s.value
              for fam in text_string_to_metric_families(text) for s in fam.samples}  # fmt: skip
    assert values["cpc_frames_out_total{}"] == eos["talk"]["frames"] == len(ref)
    assert values['cpc_streams_total{"source": "websocket"}'] == 1
    assert values["cpc_streams_active{}"] == 0
    assert values["cpc_audio_in_seconds_total{}"] == pytest.approx(len(ref) * 0.01, abs=0.02)
    assert values["cpc_batch_streams_count{}"] >= len(ref) / 4


def test_cpc_send_says_why_the_daemon_refused(small_onnx, tmp_path):
    path, _ = small_onnx
    with ingest_daemon(path, "stream.ingest_token=s3cret") as (_, url, _, _):
        r = subprocess.run([sys.executable, "-m", "cpc_stream.send", "--url", url, str(UTT_1089)],
                           cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip() == (
        "cpc-send: error: the daemon closed stream '1089-134686-0001' (code 1008): bad or missing token"
    )
    r = subprocess.run([sys.executable, "-m", "cpc_stream.send", "--url", f"ws://127.0.0.1:{free_port()}/",
                        str(UTT_1089)], cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "cannot stream to ws://127.0.0.1:" in r.stderr


def test_the_docs_ingest_example_and_close_codes_are_the_codes():
    """docs/protocol.md's worked hello is one the daemon accepts, and its close-code table lists the codes
    the ingest uses."""
    import re

    from cpc_stream import ingest

    doc = (REPO / "docs/protocol.md").read_text()
    hello = re.search(r"(\{\"type\": \"hello\".*?\})", doc.split("## Audio in")[1], re.S).group(1)
    h = ingest.parse_hello(hello)
    assert (h.stream, h.sample_rate, h.channels, h.format, h.frame_bytes) == ("alice", 48000, 2, "int16", 4)
    for code in (
        ingest.NORMAL,
        ingest.GOING_AWAY,
        ingest.BAD_DATA,
        ingest.POLICY,
        ingest.TOO_BIG,
        ingest.INTERNAL,
        ingest.TRY_LATER,
    ):
        assert f"| {code} |" in doc, code
