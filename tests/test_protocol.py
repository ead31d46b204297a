"""The wire format: the worked example of docs/protocol.md byte for byte, round trips, and rejection."""

import json

import numpy as np
import pytest
from conftest import REPO

from cpc_stream import protocol


def test_worked_example_in_the_docs_is_what_encode_produces():
    frames = protocol.encode("c", "mic", {"seq": 7, "frame": 28, "count": 1, "t_mono": 5123.25, "t_wall": 1795800000.5},
                             np.array([[0.5, -1.0]], dtype=np.float32))  # fmt: skip
    assert frames[0] == b"c.mic"
    assert frames[2].hex(" ") == "00 00 00 3f 00 00 80 bf"
    doc = (REPO / "docs/protocol.md").read_text()
    assert frames[1].decode()[:80] in doc.replace("\n                      ", "")
    assert f"frame 1 ({len(frames[1])} bytes)" in doc
    assert json.loads(frames[1]) == {"v": 1, "kind": "c", "stream": "mic", "seq": 7, "frame": 28, "count": 1,
                                     "t_mono": 5123.25, "t_wall": 1795800000.5, "dtype": "<f4", "shape": [1, 2]}  # fmt: skip


def test_round_trip_and_daemon_wide_topics():
    data = np.random.default_rng(0).standard_normal((4, 2, 12)).astype(np.float32)
    msg = protocol.decode(protocol.encode("scores", "talk-0", {"seq": 3}, data))
    assert (msg.kind, msg.stream, msg.seq) == ("scores", "talk-0", 3) and np.array_equal(msg.data, data)
    meta = protocol.decode(protocol.encode("meta", "", {"model": {"ctx_dim": 256}}))
    assert (
        meta.kind == "meta"
        and meta.stream == ""
        and meta.data is None
        and meta.header["model"]["ctx_dim"] == 256
    )
    assert protocol.topic("stats") == b"stats."


@pytest.mark.parametrize(
    "frames, message",
    [
        ([b"c.x", b"{}"], "expected 3 frames"),
        ([b"c.x", b"not json", b""], "header is not JSON"),
        ([b"c.x", b'{"v": 2}', b""], "unsupported header version 2"),
        ([b"c.x", b'{"v": 1, "dtype": "<f8", "shape": [1]}', b"\0" * 8], "unsupported dtype"),
        ([b"c.x", b'{"v": 1, "dtype": "<f4", "shape": [2, 2]}', b"\0" * 12], "does not fit shape"),
    ],
)
def test_malformed_messages_are_rejected(frames, message):
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.decode(frames)
