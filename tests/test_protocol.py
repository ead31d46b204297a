"""The wire format (docs/protocol.md, version 2): the worked example byte for byte, exact-topic
subscriptions, the checks every message passes, and a decoder and a Subscriber that no byte sequence
can crash (hypothesis)."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import zmq
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpc_stream import protocol
from cpc_stream.client import Subscriber

DOC = (REPO / "docs/protocol.md").read_text()
INSTANCE = "5f1c0e2a9b3d4c71"
DATA = {
    "instance": INSTANCE,
    "epoch": 0,
    "seq": 7,
    "frame": 28,
    "count": 1,
    "t_mono": 5123.25,
    "t_wall": 1795800000.5,
}
MODEL = {"sample_rate": 16000, "hop": 160, "frames_per_call": 4, "enc_dim": 3, "ctx_dim": 2, "n_steps": 4}
META = {"instance": INSTANCE, "model": MODEL, "streams": ["mic"], "epochs": {"mic": 0}, "kinds": ["c", "scores"],
        "meta_interval": 1.0, "stats_interval": 1.0}  # fmt: skip
EOS = {"instance": INSTANCE, "epoch": 0, "frames": 0, "reason": "end of file", "last_seq": {"c": -1},
       "dropped_s": 0.0, "nonfinite": 0}  # fmt: skip
STATS = {"instance": INSTANCE, "uptime_s": 1.0, "rtf": None, "streams": {}}


def scores_payload(frame: int, count: int, k: int) -> np.ndarray:
    """(count, 2, k) scores of frames frame.., NaN exactly where frame + i - step < 0."""
    t = frame + np.arange(count)[:, None, None]
    step = np.arange(1, k + 1)[None, None, :]
    return np.where(t - step < 0, np.nan, -1.5 * np.ones((count, 2, k))).astype(np.float32)


def test_worked_example_in_the_docs_is_what_encode_produces():
    frames = protocol.encode("c", "mic", DATA, np.array([[0.5, -1.0]], dtype=np.float32))
    assert (
        frames[0] == b"c.mic\0" and frames[0].hex(" ") in DOC and f"frame 0 ({len(frames[0])} bytes)" in DOC
    )
    assert frames[2].hex(" ") == "00 00 00 3f 00 00 80 bf" and "00 00 00 3f  00 00 80 bf" in DOC
    assert frames[1].decode() in re.sub(r"\n +", "", DOC)
    assert f"frame 1 ({len(frames[1])} bytes)" in DOC
    assert json.loads(frames[1]) == {
        "v": 2,
        "kind": "c",
        "stream": "mic",
        **DATA,
        "dtype": "<f4",
        "shape": [1, 2],
    }
    assert protocol.decode(frames).data.tolist() == [[0.5, -1.0]]


def test_every_required_header_key_is_documented():
    """The decoder's schema and the doc's tables name the same keys, so a subscriber written from the
    doc accepts what the daemon sends."""
    for kind, schema in protocol.SCHEMAS.items():
        for key in schema:
            assert f"`{key}`" in DOC, (kind, key)
    for key in protocol.MODEL_KEYS:
        assert f"`{key}`" in DOC, key


def test_round_trip_of_every_kind():
    c = protocol.decode(protocol.encode("c", "talk-0", DATA, np.ones((1, 2), np.float32)))
    assert (c.kind, c.stream, c.seq, c.run) == ("c", "talk-0", 7, (INSTANCE, 0))
    s = scores_payload(10, 4, 12)
    got = protocol.decode(protocol.encode("scores", "réunion", {**DATA, "frame": 10, "count": 4}, s))
    assert got.stream == "réunion" and np.array_equal(got.data, s, equal_nan=True)
    for kind, head in (("meta", META), ("stats", STATS)):
        msg = protocol.decode(protocol.encode(kind, "", head))
        assert (
            msg.kind == kind and msg.stream == "" and msg.data is None and msg.header["instance"] == INSTANCE
        )
    assert protocol.decode(protocol.encode("eos", "mic", EOS)).header["last_seq"] == {"c": -1}
    assert protocol.topic("stats") == b"stats.\0" and protocol.subscription("c") == b"c."
    assert protocol.subscription("c", "mic") == b"c.mic\0" and protocol.subscription() == b""


def test_one_streams_subscription_receives_that_stream_alone():
    """Stream names that extend one another (mic, mic2, mic_left-1) do not leak into each other's
    subscriptions: the NUL that ends every topic makes the subscription exact."""
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        pub.bind("inproc://leak")
        sub.connect("inproc://leak")
        sub.setsockopt(zmq.SUBSCRIBE, protocol.subscription("c", "mic"))
        time.sleep(0.05)
        for name in ("mic2", "mic", "mic_left-1", "bit24-10"):
            pub.send_multipart(protocol.encode("c", name, DATA, np.zeros((1, 2), np.float32)))
        got = []
        while sub.poll(200):
            got.append(protocol.decode(sub.recv_multipart()).stream)
        assert got == ["mic"]
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()


def good(kind: str = "c", **head) -> list[bytes]:
    data = {
        "c": np.zeros((1, 2), np.float32),
        "z": np.zeros((1, 3), np.float32),
        "scores": scores_payload(28, 1, 4),
    }
    return protocol.encode(kind, "mic", {**DATA, **head}, data[kind])


def with_header(frames: list[bytes], **changes) -> list[bytes]:
    head = json.loads(frames[1])
    head.update(changes)
    return [frames[0], json.dumps(head).encode(), frames[2]]


MALFORMED = [
    ([b"c.mic\0", b"{}"], "expected 3 frames"),
    ([b"c.mic", good()[1], good()[2]], "does not end with NUL"),
    ([b"\xff.mic\0", good()[1], good()[2]], "not UTF-8"),
    ([b"x.mic\0", good()[1], good()[2]], "unknown kind"),
    ([b"meta.mic\0", protocol.encode("meta", "", META)[1], b""], "has no stream"),
    ([b"c.\0", good()[1], good()[2]], "needs a stream"),
    ([good()[0], b"not json", good()[2]], "header is not JSON"),
    ([good()[0], b"\xff\xfe", good()[2]], "header is not JSON"),
    ([good()[0], b"[1, 2]", good()[2]], "not an object"),
    (with_header(good(), v=1), "header version 1"),
    (with_header(good(), kind="z"), "differ from the topic"),
    (with_header(good(), stream="mic2"), "differ from the topic"),
    ([good()[0], good()[1].replace(b'"t_mono":5123.25', b'"t_mono":NaN'), good()[2]], "NaN"),
    (with_header(good(), seq=-1), "'seq' has a bad value"),
    (with_header(good(), seq=1.5), "'seq' has a bad value"),
    (with_header(good(), count=True), "'count' has a bad value"),
    (with_header(good("scores"), frame=2**70), "'frame' has a bad value"),
    (with_header(good(), instance=""), "'instance' has a bad value"),
    ([good()[0], json.dumps({k: v for k, v in json.loads(good()[1]).items() if k != "frame"}).encode(), good()[2]], "lacks 'frame'"),
    (with_header(good(), dtype="<f8"), "dtype"),
    (with_header(good(), shape=[1, 2, 1]), "shape"),
    (with_header(good(), shape=[2, 1]), "does not match"),
    (with_header(good(), shape=[1, 1 << 30]), "more than"),
    ([*good()[:2], b"\0" * 12], "does not fit shape"),
    ([*good()[:2], np.array([[np.nan, 0]], np.float32).tobytes()], "NaN or Inf"),
    ([*good("scores", frame=0)[:2], np.zeros((1, 2, 4), np.float32).tobytes()], "where it is not"),
    ([*good("scores")[:2], np.full((1, 2, 4), np.nan, np.float32).tobytes()], "NaN or Inf where a score is defined"),
    (protocol.encode("eos", "mic", {**EOS, "last_seq": {"q": 1}}), "'last_seq' has a bad value"),
    (protocol.encode("eos", "mic", {**EOS, "dropped_s": -1}), "'dropped_s' has a bad value"),
    ([*protocol.encode("eos", "mic", EOS)[:2], b"x"], "carries a payload"),
    (protocol.encode("meta", "", {**META, "model": {**MODEL, "ctx_dim": 0}}), "'model' has a bad value"),
    (protocol.encode("meta", "", {**META, "kinds": ["q"]}), "'kinds' has a bad value"),
    (protocol.encode("stats", "", {**STATS, "rtf": "fast"}), "'rtf' has a bad value"),
]  # fmt: skip


@pytest.mark.parametrize("frames, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_messages_are_rejected_with_their_reason(frames, message):
    with pytest.raises(protocol.ProtocolError, match=re.escape(message)):
        protocol.decode(frames)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_any_bytes_decode_or_raise_protocol_error(frames):
    """No sequence of frames makes the decoder raise anything but ProtocolError."""
    try:
        msg = protocol.decode(frames)
    except protocol.ProtocolError:
        return
    assert msg.kind in protocol.KINDS


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(["c", "scores", "eos", "meta"]), key=st.text(max_size=12), value=JSON,
       cut=st.integers(0, 40))  # fmt: skip
def test_valid_messages_with_one_header_value_changed_never_crash_the_decoder(kind, key, value, cut):
    """A real message with any header key set to any JSON value, or its payload cut short: the decoder
    accepts it (unknown keys are ignored) or says why not."""
    frames = {"c": good(), "scores": good("scores"), "eos": protocol.encode("eos", "mic", EOS),
              "meta": protocol.encode("meta", "", META)}[kind]  # fmt: skip
    frames = with_header(frames, **{key or "seq": value})
    frames[2] = frames[2][: len(frames[2]) - cut]
    try:
        msg = protocol.decode(frames)
    except protocol.ProtocolError:
        return
    if msg.data is not None:
        assert msg.data.shape == tuple(msg.header["shape"]) and msg.data.shape[0] == msg.header["count"]


@pytest.fixture
def publisher():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    yield pub, f"tcp://127.0.0.1:{port}"
    pub.close(0)
    ctx.term()


def connected(pub, endpoint: str, **kw) -> Subscriber:
    sub = Subscriber(endpoint, **kw)
    deadline = time.monotonic() + 5
    while (
        sub.meta is None and time.monotonic() < deadline
    ):  # the subscription is in place once meta gets through
        pub.send_multipart(protocol.encode("meta", "", META))
        sub._read(50)
    assert sub.meta is not None
    return sub


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.binary(max_size=64), min_size=1, max_size=4), min_size=1, max_size=20))
def test_a_subscriber_skips_and_counts_garbage_and_keeps_receiving(publisher, garbage):
    """Malformed messages on the wire are counted with their reason and skipped: recv() neither raises nor
    loses the valid messages around them."""
    pub, endpoint = publisher
    with connected(pub, endpoint, kinds=("c",)) as sub:
        pub.send_multipart(good(seq=0))
        for frames in garbage:
            pub.send_multipart([b"c.mic\0", *frames][:4])
        pub.send_multipart(good(seq=1))
        got = []
        while (msg := sub.recv(timeout=0.5)) is not None:
            got.append(msg)
        assert [m.seq for m in got if m.kind == "c"] == [0, 1]
        assert sum(sub.malformed.values()) >= len(garbage) - sum(
            1 for g in garbage if len(g) == 2 and _valid([b"c.mic\0", *g])
        )
        assert sub.gaps == []


def _valid(frames) -> bool:
    try:
        protocol.decode(frames)
    except protocol.ProtocolError:
        return False
    return True


def test_a_subscriber_checks_messages_against_the_metadata(publisher):
    """A c message whose width is not the metadata's ctx_dim, or with more frames than frames_per_call,
    is skipped with its reason."""
    pub, endpoint = publisher
    with connected(pub, endpoint, kinds=("c",)) as sub:
        pub.send_multipart(protocol.encode("c", "mic", DATA, np.zeros((1, 5), np.float32)))
        pub.send_multipart(protocol.encode("c", "mic", {**DATA, "count": 9}, np.zeros((9, 2), np.float32)))
        pub.send_multipart(good(seq=8))
        msg = sub.recv(timeout=2)
        assert msg is not None and msg.seq == 8
        assert any("ctx_dim" in r or "says 2" in r for r in sub.malformed) and any(
            "frames_per_call" in r for r in sub.malformed
        )


def test_restart_is_told_apart_from_a_gap_and_silence_is_measured(publisher):
    """A new instance (the daemon restarted) starts a new run at seq 0: a restart, not a gap. A jump
    within a run is a gap. silent_for() grows while nothing arrives."""
    pub, endpoint = publisher
    with connected(pub, endpoint, kinds=("c",)) as sub:
        for seq in (0, 1, 3):  # seq 2 lost
            pub.send_multipart(good(seq=seq))
        pub.send_multipart(good(seq=0, instance="a" * 16, frame=0))  # a new daemon run
        pub.send_multipart(good(seq=1, instance="a" * 16, frame=1))
        got = [sub.recv(timeout=2) for _ in range(5)]
        assert [m.run[0] for m in got] == [INSTANCE] * 3 + ["a" * 16] * 2
        assert sub.gaps == [("c", "mic", 2, 3)] and sub.lost == 1
        assert sub.restarts == [("mic", (INSTANCE, 0), ("a" * 16, 0))]
        time.sleep(0.3)
        assert sub.recv(timeout=0.1) is None and sub.silent_for() >= 0.3
