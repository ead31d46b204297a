"""The streaming contract has one owner (cpc_stream/contract.py), and docs/onnx-contract.md says what it
says: the state layout, the outputs and every metadata key, with an example metadata that is what
cpc-export really writes."""

import json
import re

import pytest
import torch
from conftest import REPO
from cpc_export.graph import export_onnx
from cpc_training import config
from cpc_training.model import CPC

from cpc_stream import contract
from cpc_stream.onnx_model import OnnxModel

DOC = (REPO / "docs/onnx-contract.md").read_text()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small model exported as cpc-export does, F=2, W=16."""
    cfg = config.load(None, ["model.enc_dim=32", "model.ctx_dim=16", "model.n_steps=3"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("contract") / "m.onnx"
    export_onnx(CPC(cfg.model).eval(), cfg, 7, path, 2, 16)
    return OnnxModel(path)


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
    assert f"`{contract.FORMAT_KEY}`" in DOC and f"`{contract.FORMAT_NAME}/{contract.FORMAT_VERSION}`" in DOC


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
