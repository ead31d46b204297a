"""The streaming contract has one owner (cpc_stream/contract.py), and docs/onnx-contract.md says what it
says: the state layout, the outputs and every metadata key, with an example metadata that is what
cpc-export really writes. Graphs with look-ahead and without scores (imported CPC_audio models) say so in
their metadata, and a runtime refuses metadata that contradicts them."""

import json
import re

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO
from cpc_export.graph import export_onnx
from cpc_training import config
from cpc_training.cpc_audio import CPCAudio, CPCAudioConfig
from cpc_training.model import CPC

from cpc_stream import contract
from cpc_stream.errors import UserError
from cpc_stream.onnx_model import ChunkedStream, OnnxModel

DOC = (REPO / "docs/onnx-contract.md").read_text()


@pytest.fixture(scope="module")
def exported_file(tmp_path_factory):
    """A small model exported as cpc-export does, F=2, W=16."""
    cfg = config.load(None, ["model.enc_dim=32", "model.ctx_dim=16", "model.n_steps=3"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("contract") / "m.onnx"
    export_onnx(CPC(cfg.model).eval(), cfg, 7, path, 2, 16)
    return path


@pytest.fixture(scope="module")
def exported(exported_file):
    return OnnxModel(exported_file)


def test_the_graph_is_the_contracts_layout(exported):
    """Inputs, outputs, state names, order, shapes, dtypes and in-place states of a written graph are the
    ones contract.state_layout gives for its dimensions."""
    layout = contract.state_layout(32, 16, 3, 2, 16)
    inputs = exported.session.get_inputs()
    assert [i.name for i in inputs] == [contract.AUDIO, *(s.name for s in layout)]
    assert [o.name for o in exported.session.get_outputs()] == [
        *contract.OUTPUT_NAMES,
        *(f"new_{s.name}" for s in layout),
    ]
    for node, s in zip(inputs[1:], layout, strict=True):
        assert node.shape[1:] == list(s.shape[1:]) and contract.ONNX_DTYPES[node.type].__name__ == s.dtype
    info = exported.info
    assert info.state_names == contract.STATE_NAMES
    assert info.state_shapes == {s.name: list(s.shape) for s in layout}
    assert info.inplace_state == tuple(s.name for s in layout if s.inplace)


def test_the_docs_name_every_state_output_and_metadata_key():
    for s in contract.state_layout(512, 256, 12, 1, 128):
        assert f"| `{s.name}` |" in DOC and f"| `new_{s.name}` |" in DOC, s.name
    for name in contract.OUTPUT_NAMES:
        assert f"| `{name}` |" in DOC, name
    for key in contract.ModelInfo.__dataclass_fields__:
        assert f"`{key}`" in DOC, key
    assert f"`{contract.FORMAT_KEY}`" in DOC
    for version in contract.FORMAT_VERSIONS:
        assert f"`{contract.FORMAT_NAME}/{version}`" in DOC, version
    for name in contract.state_layout(256, 256, 0, 1, 0, 13, "lstm", 2):  # an imported model's state
        assert f"`{name.name}`" in DOC and f"`new_{name.name}`" in DOC, name.name


def test_the_docs_example_metadata_is_what_cpc_export_writes_for_the_paper_model():
    """The example values of the metadata table: state_names, inplace_state and state_shapes (JSON) for
    the paper-size model at F=1, W=128, exactly as to_metadata() writes them."""
    layout = contract.state_layout(512, 256, 12, 1, 128)
    info = contract.ModelInfo(
        sample_rate=16000, hop=160, frames_per_call=1, enc_dim=512, ctx_dim=256, n_steps=12, neg_window=128,
        score="cosine", temperature=0.1, norm="channel", state_shapes={s.name: list(s.shape) for s in layout},
        inplace_state=tuple(s.name for s in layout if s.inplace),
    )  # fmt: skip
    meta = info.to_metadata()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| `([^`]*)` \|", DOC, re.M)}
    for key in ("state_names", "inplace_state", "state_shapes", "sample_rate", "frames_per_call"):
        assert rows.get(key) == meta[key], (key, rows.get(key), meta[key])
    assert json.loads(rows["state_shapes"])["cache_conv1"] == ["B", 5]


@pytest.fixture(scope="module")
def lookahead_graph(tmp_path_factory):
    """A small CPC_audio-shaped model (its padding, a 2-layer LSTM, no predictors), exported at F=2."""
    cfg = CPCAudioConfig(enc_dim=32, ctx_dim=16, norm="channel", ar="lstm", ar_layers=2, n_steps=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lookahead") / "m.onnx"
    export_onnx(CPCAudio(cfg).eval(), cfg, 0, path, 2, 128)
    return path


def test_our_graphs_stay_format_1_and_a_look_ahead_graph_says_format_2(exported, lookahead_graph):
    """cpc-train's graphs keep format 1 (older runtimes serve them); a graph with look-ahead says format 2,
    its look-ahead, its outputs z and c, no rings, and its LSTM's state per layer."""
    meta = exported.session.get_modelmeta().custom_metadata_map
    assert meta[contract.FORMAT_KEY] == "cpc-stream-onnx/1" and exported.info.lookahead == 0
    model = OnnxModel(lookahead_graph)
    meta = model.session.get_modelmeta().custom_metadata_map
    assert (
        meta[contract.FORMAT_KEY] == "cpc-stream-onnx/2"
        and meta["lookahead"] == "152"
        and meta["outputs"] == "z,c"
    )
    info = model.info
    assert (info.delay, info.has_scores, info.n_steps, info.neg_window, info.inplace_state) == (
        1,
        False,
        0,
        0,
        (),
    )
    assert info.state_names == ("cache_conv1", "cache_conv2", "cache_conv3", "cache_conv4", "cache_conv5",
                                "lstm_h", "lstm_c", "lstm_h2", "lstm_c2", "frame_index")  # fmt: skip
    assert info.state_shapes["cache_conv1"] == ["B", 13]
    assert [o.name for o in model.session.get_outputs()][:3] == ["z", "c", "new_cache_conv1"]


def test_chunked_stream_drops_the_outputs_before_frame_0_and_finishes_the_last_hops(lookahead_graph):
    """A look-ahead graph returns frame t one hop late: ChunkedStream drops the stream's first output
    (not a frame), gives n - 1 frames for n hops (F=2, so finish() runs a last odd hop zero-padded), and
    starts over after finish(): the same audio gives the same frames."""
    stream = ChunkedStream(OnnxModel(lookahead_graph))
    audio = np.random.default_rng(0).standard_normal(160 * 7 + 50).astype(np.float32) * 0.1
    first = stream.feed(audio)
    assert len(first["c"]) == 5  # 3 calls of 2 hops: 6 outputs, the first not a frame
    rest = stream.finish()
    again = {k: np.concatenate([stream.feed(audio)[k], stream.finish()[k]]) for k in ("c", "z")}
    got = np.concatenate([first["c"], rest["c"]])
    assert len(got) == 7 - 1 and np.array_equal(got, again["c"]) and set(first) == {"z", "c"}


def _edited(src, tmp_path, **meta) -> OnnxModel:
    proto = onnx.load(str(src))
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **meta})
    onnx.save(proto, str(tmp_path / "edited.onnx"))
    return OnnxModel(tmp_path / "edited.onnx")


@pytest.mark.parametrize(
    "graph, meta, message",
    [
        ("lookahead", {contract.FORMAT_KEY: "cpc-stream-onnx/1"},
         "format cpc-stream-onnx/1 does not fit a look-ahead of 152 samples"),
        ("ours", {contract.FORMAT_KEY: "cpc-stream-onnx/2"}, "format cpc-stream-onnx/2 does not fit a look-ahead of 0"),
        ("lookahead", {"lookahead": "-1"}, "metadata lookahead is -1"),
        ("ours", {"outputs": "z,c"}, "graph outputs scores, logprob, valid, which its metadata .* says it has not"),
        ("lookahead", {"outputs": "z,c,scores,logprob,valid", "n_steps": "3", "neg_window": "4"},
         "graph outputs lack logprob, scores, valid"),
        ("ours", {"outputs": "z,c,scores"}, "outputs z,c,scores: expected z,c,scores,logprob,valid or z,c"),
        ("lookahead", {"n_steps": "12"}, "metadata n_steps is 12, expected 0: the graph has no scores"),
    ],
)  # fmt: skip
def test_metadata_that_contradicts_timing_or_outputs_is_refused(
    exported_file, lookahead_graph, tmp_path, graph, meta, message
):
    """A format 1 graph that declares look-ahead (a format 1 runtime would misread its timing), metadata
    that lists outputs the graph lacks or leaves out score outputs it has, and a count of scores for a
    graph without any: each is one line, at load."""
    src = lookahead_graph if graph == "lookahead" else exported_file
    with pytest.raises(UserError, match=message) as e:
        _edited(src, tmp_path, **meta)
    assert "\n" not in str(e.value)
