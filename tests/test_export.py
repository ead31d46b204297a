"""The streaming ONNX graph equals the offline model, whatever the chunking, batch and length."""

import glob
import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import MINI, UTT_1089
from cpc_export import cli, graph, proof
from cpc_export.graph import export_onnx
from cpc_export.proof import check_streams, compare
from cpc_training import checkpoint, config, train
from cpc_training.features import extract
from cpc_training.model import CPC
from onnx import helper

from cpc_stream.audio import load_audio
from cpc_stream.contract import OUTPUT_NAMES, STATE_NAMES
from cpc_stream.errors import UserError
from cpc_stream.onnx_model import ChunkedStream, OnnxModel, StreamBatch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model after a few real training steps (weights that are not an initialisation)."""
    out = tmp_path_factory.mktemp("ckpt")
    cfg = config.load(None, [f"data.root={MINI}", "model.enc_dim=64", "model.ctx_dim=32", "model.n_steps=5",
                             "data.window=6400", "data.workers=0", "negatives.count=16", "train.lr=2e-3",
                             "train.max_steps=15", f"train.out_dir={out}", "train.threads=1"])  # fmt: skip
    train.train(cfg, quiet=True)
    ckpt = checkpoint.load_checkpoint(out / "checkpoint.pt")
    model, cfg = checkpoint.model_from_checkpoint(ckpt)
    return model, cfg, out / "checkpoint.pt"


# (10, 6): a call longer than both rings (K = 5, W = 6), so each keeps only the call's last frames.
@pytest.mark.parametrize("frames_per_call, window", [(1, 16), (3, 8), (10, 6)])
@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_graph_matches_offline_model_over_many_calls(tmp_path, trained, frames_per_call, window, score):
    model, cfg, _ = trained
    if score != cfg.model.score:  # same weights, other score function
        cfg = config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "score": score}})
        model = CPC(cfg.model).eval()
        model.load_state_dict(trained[0].state_dict())
    path = tmp_path / "m.onnx"
    export_onnx(model, cfg, 15, path, frames_per_call, window)
    for audio_file in (None, UTT_1089):
        audio = check_streams(model, audio_file, 210, frames_per_call * 160)
        diffs = compare(path, model, audio)
        assert diffs["z"] < 1e-4 and diffs["c"] < 1e-4, diffs
        assert diffs["scores"] < 1e-3 and diffs["logprob"] < 1e-3, diffs


def test_every_real_utterance_streams_to_its_offline_features(tmp_path, trained):
    """All 13 shared utterances (up to 15.7 s, i.e. 1,500+ frames: no drift) as one batch of streams."""
    model, cfg, _ = trained
    path = tmp_path / "m.onnx"
    export_onnx(model, cfg, 15, path, 10, 32)
    runtime = OnnxModel(path, providers="cpu")
    files = sorted(glob.glob(str(MINI / "*/*/*/*.flac")))
    assert len(files) == 13
    wavs = [load_audio(f, 16000) for f in files]
    n = runtime.info.samples_per_call
    longest = max(len(w) for w in wavs) // n * n + n
    batch = np.stack([np.pad(w, (0, longest - len(w))) for w in wavs])
    state = runtime.zero_state(len(files))
    cs = []
    for i in range(longest // n):
        out, state = runtime.step(batch[:, i * n : (i + 1) * n], state)
        cs.append(out["c"])
    c_stream = np.concatenate(cs, axis=1)
    for row, w in enumerate(wavs):
        ref = extract(model, w, 32)["c"]
        assert np.abs(c_stream[row, : len(ref)] - ref).max() < 1e-4, files[row]
    assert max(len(w) for w in wavs) > 15 * 16000  # 1500+ frames threaded through one state


def test_any_chunking_and_reset_give_the_offline_result(tmp_path, trained):
    model, cfg, _ = trained
    path = tmp_path / "m.onnx"
    export_onnx(model, cfg, 15, path, 4, 16)
    runtime = OnnxModel(path, providers="cpu")
    wav = load_audio(UTT_1089, 16000)
    wav = wav[: len(wav) // 640 * 640]  # whole calls of F=4 hops
    ref = extract(model, wav, 16)
    stream = ChunkedStream(runtime)
    rng = np.random.default_rng(0)
    pieces, pos = [], 0
    while pos < len(wav):
        size = int(rng.integers(1, 3000))
        pieces.append(stream.feed(wav[pos : pos + size]))
        pos += size
    got = {k: np.concatenate([p[k] for p in pieces]) for k in ("z", "c", "logprob")}
    assert got["c"].shape == ref["c"].shape
    assert np.abs(got["c"] - ref["c"]).max() < 1e-4
    assert np.allclose(got["logprob"], ref["logprob"], atol=1e-3, equal_nan=True)
    # Resetting a stream's rows makes it start over: the same audio gives the same frames again.
    state = runtime.zero_state(2)
    n = runtime.info.samples_per_call
    two = np.stack([wav[:n], wav[n : 2 * n]])
    first, state = runtime.step(two, state)
    runtime.reset(state, rows=[1])
    again, _ = runtime.step(np.stack([wav[n : 2 * n], wav[:n]]), state)
    assert np.abs(again["c"][1] - first["c"][0]).max() < 1e-6
    assert state["frame_index"].tolist() == [4, 0]


def test_stream_batch_equals_step_with_the_state_threaded_through(small_onnx):
    """StreamBatch (state bound once, double-buffered) gives exactly what OnnxModel.step gives with
    the state passed back in, across 60 calls, a reset of one stream and a write into its state."""
    path, model = small_onnx
    runtime = OnnxModel(path, providers="cpu")
    audio = check_streams(model, UTT_1089, 60, runtime.info.samples_per_call)
    n = runtime.info.samples_per_call
    batch, state = StreamBatch(runtime, 3), runtime.zero_state(3)
    for i in range(60):
        if i == 25:  # stream 1 starts over in both
            batch.reset([1])
            runtime.reset(state, [1])
        want, state = runtime.step(audio[:, i * n : (i + 1) * n], state)
        got = batch.step(audio[:, i * n : (i + 1) * n])
        for k in want:
            assert np.array_equal(got[k], want[k], equal_nan=True), (i, k)
    for k in state:
        assert np.array_equal(batch.state[k], state[k]), k
    assert batch.state["frame_index"].tolist() == [240, 140, 240]
    with pytest.raises(ValueError, match="audio must be"):
        batch.step(audio[:2, :n])


def test_rings_are_written_in_place_and_read_only_by_their_write(small_onnx):
    """cpc-export declares both rings in place, because in its graph each ring input is read only by the
    ScatterND writing its new slots; StreamBatch then binds one buffer as input and output, so a call
    writes into it instead of copying the ring (equality with OnnxModel.step, which never aliases,
    is test_stream_batch_equals_step_with_the_state_threaded_through). A graph in which another node
    reads a ring before or after the write is not declared in place."""
    path, _ = small_onnx
    runtime = OnnxModel(path, providers="cpu")
    assert runtime.info.inplace_state == ("pred_history", "z_history")
    proto = onnx.load(str(path))
    assert graph.inplace_states(proto, STATE_NAMES) == ("pred_history", "z_history")
    proto.graph.node.append(helper.make_node("Identity", ["z_history"], ["peek"]))
    assert graph.inplace_states(proto, STATE_NAMES) == ("pred_history",)

    batch = StreamBatch(runtime, 2)
    ring, gru_h = batch.state["z_history"], batch.state["gru_h"]
    audio = np.random.default_rng(0).standard_normal((2, runtime.info.samples_per_call)).astype(np.float32)
    batch.step(audio)
    assert batch.state["z_history"] is ring and np.abs(ring).sum() > 0  # written where it lies
    assert batch.state["gru_h"] is not gru_h  # the small state alternates between two sets


def test_gru_node_computes_torch_gru(tmp_path, trained):
    """The exported GRU keeps linear_before_reset=1 (pytorch#189225), and the node alone equals nn.GRU."""
    model, cfg, _ = trained
    path = tmp_path / "m.onnx"
    export_onnx(model, cfg, 15, path, 4, 8)
    proto = onnx.load(str(path))
    (gru,) = [n for n in proto.graph.node if n.op_type == "GRU"]
    attrs = {a.name: helper.get_attribute_value(a) for a in gru.attribute}
    assert attrs["linear_before_reset"] == 1
    inits = {i.name: i for i in proto.graph.initializer}
    # Rebuild a graph holding only that node (its W, R, B weights) and feed it random sequences.
    w_r_b = [n for n in gru.input[1:4]]
    consts = [n for n in proto.graph.node if n.output and n.output[0] in w_r_b]
    single = helper.make_graph(
        [*consts, helper.make_node("GRU", ["x", *w_r_b, "", "h0"], ["y", "h"], **attrs)], "gru",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [6, 3, 64]),
         helper.make_tensor_value_info("h0", onnx.TensorProto.FLOAT, [1, 3, 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, None)],
        initializer=[inits[n] for n in w_r_b if n in inits],
    )  # fmt: skip
    sess = ort.InferenceSession(helper.make_model(single, opset_imports=proto.opset_import).SerializeToString(),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    x, h0 = torch.randn(6, 3, 64), torch.randn(1, 3, 32)
    y_ort, h_ort = sess.run(None, {"x": x.numpy(), "h0": h0.numpy()})
    with torch.no_grad():
        y_ref, h_ref = model.gru(x.transpose(0, 1), h0)
    assert np.abs(y_ort[:, 0].transpose(1, 0, 2) - y_ref.numpy()).max() < 1e-5
    assert np.abs(h_ort - h_ref.numpy()).max() < 1e-5


def _plain_graph(path, meta):
    g = helper.make_graph([helper.make_node("Identity", ["audio"], ["z"])], "g",
                          [helper.make_tensor_value_info("audio", onnx.TensorProto.FLOAT, [1, 160])],
                          [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 160])])  # fmt: skip
    m = helper.make_model(g)
    helper.set_model_props(m, meta)
    onnx.save(m, str(path))


def test_loader_refuses_unknown_or_incomplete_metadata(tmp_path, trained):
    _plain_graph(tmp_path / "a.onnx", {})
    with pytest.raises(UserError, match="not a cpc-stream model"):
        OnnxModel(tmp_path / "a.onnx")
    _plain_graph(tmp_path / "b.onnx", {"cpc_stream.format": "cpc-stream-onnx/99"})
    with pytest.raises(UserError, match="format 'cpc-stream-onnx/99' is not supported"):
        OnnxModel(tmp_path / "b.onnx")
    model, cfg, _ = trained
    export_onnx(model, cfg, 15, tmp_path / "c.onnx", 1, 8)
    proto = onnx.load(str(tmp_path / "c.onnx"))
    kept = [p for p in proto.metadata_props if p.key != "neg_window"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(tmp_path / "c.onnx"))
    with pytest.raises(UserError, match="metadata key 'neg_window' is missing"):
        OnnxModel(tmp_path / "c.onnx")
    (tmp_path / "d.onnx").write_bytes(b"not a graph")
    with pytest.raises(UserError, match="d.onnx is not a loadable ONNX graph"):
        OnnxModel(tmp_path / "d.onnx")


def _graph_with_other_state(path, state_names, counter_dtype=np.int64, inplace=()):
    """A toy graph in the contract (F=1, C=H=2, K=1) whose state is "acc" (B, 2) float32, a running sum
    of the first two samples, and "counter" (B,) int64: another state than cpc-export writes, as a graph
    of an older or newer layout has. c = the new sum; scores = the counter before the call."""
    from onnx import TensorProto as T
    from onnx import numpy_helper

    from cpc_stream.contract import ModelInfo

    counter_type = helper.np_dtype_to_tensor_dtype(np.dtype(counter_dtype))
    const = [numpy_helper.from_array(np.array(v, dtype=d), n) for n, v, d in [
        ("start", [0], np.int64), ("two", [2], np.int64), ("axis1", [1], np.int64), ("axes12", [1, 2], np.int64),
        ("one", 1, counter_dtype), ("minus", -1.0, np.float32)]]  # fmt: skip
    nodes = [
        helper.make_node("Slice", ["audio", "start", "two", "axis1"], ["head"]),
        helper.make_node("Add", ["acc", "head"], ["new_acc"]),
        helper.make_node("Unsqueeze", ["head", "axis1"], ["z"]),
        helper.make_node("Unsqueeze", ["new_acc", "axis1"], ["c"]),
        helper.make_node("Cast", ["counter"], ["count_f"], to=T.FLOAT),
        helper.make_node("Unsqueeze", ["count_f", "axes12"], ["scores"]),
        helper.make_node("Identity", ["scores"], ["logprob"]),
        helper.make_node("Greater", ["scores", "minus"], ["valid"]),
        helper.make_node("Add", ["counter", "one"], ["new_counter"]),
    ]
    io = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "toy",
        [io("audio", T.FLOAT, ["B", 160]), io("acc", T.FLOAT, ["B", 2]), io("counter", counter_type, ["B"])],
        [io(n, T.FLOAT, None) for n in ("z", "c", "scores", "logprob")]
        + [io("valid", T.BOOL, None), io("new_acc", T.FLOAT, None), io("new_counter", counter_type, None)],
        const)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    info = ModelInfo(
        sample_rate=16000, hop=160, frames_per_call=1, enc_dim=2, ctx_dim=2, n_steps=1, neg_window=4,
        score="cosine", temperature=0.1, norm="channel", state_shapes={"acc": ["B", 2], "counter": ["B"]},
        state_names=state_names, inplace_state=inplace,
    )  # fmt: skip
    helper.set_model_props(model, info.to_metadata())
    onnx.save(model, str(path))


def test_runtime_takes_the_state_from_the_graphs_metadata(tmp_path):
    """A graph whose state is not the one cpc-export writes today (older graphs hold pred_history) runs
    through OnnxModel and StreamBatch by the names, shapes and dtypes it declares; a graph whose
    declared names do not match its inputs, or whose state has a dtype the runtime cannot hold, is refused
    with a one-line error."""
    _graph_with_other_state(tmp_path / "toy.onnx", ("acc", "counter"))
    runtime = OnnxModel(tmp_path / "toy.onnx", providers="cpu")
    state = runtime.zero_state(2)
    assert (
        state["acc"].dtype == np.float32
        and state["counter"].dtype == np.int64
        and list(state) == ["acc", "counter"]
    )
    batch = StreamBatch(runtime, 2)
    audio = np.arange(2 * 160, dtype=np.float32).reshape(2, 160)
    for _ in range(3):
        out = batch.step(audio)
    assert out["c"][:, 0].tolist() == [[0.0, 3.0], [480.0, 483.0]] and out["scores"][:, 0, 0].tolist() == [
        2,
        2,
    ]
    assert batch.state["counter"].tolist() == [3, 3]
    _graph_with_other_state(tmp_path / "bad.onnx", ("counter", "acc"))
    with pytest.raises(
        UserError, match=r"graph inputs \['audio', 'acc', 'counter'\] are not audio \+ counter, acc"
    ):
        OnnxModel(tmp_path / "bad.onnx")
    _graph_with_other_state(tmp_path / "int32.onnx", ("acc", "counter"), np.int32)
    with pytest.raises(UserError, match=r"state input counter has type tensor\(int32\)"):
        OnnxModel(tmp_path / "int32.onnx")
    _graph_with_other_state(tmp_path / "inplace.onnx", ("acc", "counter"), inplace=("ring",))
    with pytest.raises(UserError, match=r"inplace_state names ring, not a state"):
        OnnxModel(tmp_path / "inplace.onnx")


def test_metadata_describes_the_state(tmp_path, trained):
    model, cfg, _ = trained
    export_onnx(model, cfg, 15, tmp_path / "m.onnx", 2, 8)
    info = OnnxModel(tmp_path / "m.onnx").info
    assert (info.frames_per_call, info.neg_window, info.n_steps, info.ctx_dim) == (2, 8, 5, 32)
    assert info.config_hash == cfg.model_hash() and info.train_step == 15
    assert info.state_shapes["pred_history"] == ["B", 7, 5, 64]  # K + F slots of K predictions
    assert info.state_shapes["z_history"] == ["B", 10, 64]  # W + F slots
    state = OnnxModel(tmp_path / "m.onnx").zero_state(3)
    assert state["cache_conv1"].shape == (3, 5) and state["cache_conv2"].shape == (3, 1, 64)
    assert state["frame_index"].dtype == np.int64 and list(state) == list(info.state_names)


def test_cli_proves_and_writes(tmp_path, trained, capsys):
    _, _, ckpt = trained
    out = tmp_path / "ok.onnx"
    assert cli.main(["--checkpoint", str(ckpt), "--out", str(out), "--check-calls", "50"]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "check speech: 3 streams x 50 calls: max |diff| z=" in text


def test_cli_fails_above_tolerance_and_leaves_no_file(tmp_path, trained, capsys, monkeypatch):
    _, _, ckpt = trained
    monkeypatch.setattr(proof, "TOLERANCE", {"z": 0.0, "c": 0.0, "scores": 0.0, "logprob": 0.0})
    out = tmp_path / "bad.onnx"
    assert cli.main(["--checkpoint", str(ckpt), "--out", str(out), "--check-calls", "20"]) == 2
    assert "streaming graph differs from the offline model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_inputs_are_one_line_errors(tmp_path, trained, capsys):
    _, _, ckpt = trained
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    wrong = tmp_path / "wrong.pt"
    state = torch.load(ckpt, weights_only=False)
    state["config"]["model"]["ctx_dim"] = 48
    torch.save(state, wrong)
    (tmp_path / "afile").write_text("")
    cases = [
        (["--checkpoint", str(tmp_path / "none.pt")], "checkpoint .*none.pt not found"),
        (["--checkpoint", str(garbage)], "checkpoint .*garbage.pt is unreadable"),
        (["--checkpoint", str(wrong)], "checkpoint weights do not fit its own config"),
        (
            ["--checkpoint", str(ckpt), "--out", str(tmp_path / "afile" / "m.onnx")],
            "output folder .*afile does not exist",
        ),
    ]
    for args, pattern in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "m.onnx")]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        import re

        assert re.search(pattern, err), err


def test_gru_spelt_out_as_matmuls_equals_the_gru(trained):
    """The int8 variant's GRU (two products per frame and the gates) computes exactly nn.GRU's step."""
    from cpc_export.step import CPCStep, zero_state

    model, _, _ = trained
    audio = torch.from_numpy(check_streams(model, UTT_1089, 3, 4 * 160)[:, : 4 * 160])
    state = dict(zip(STATE_NAMES, zero_state(model, 8, 4, 3), strict=True))
    state["gru_h"] = torch.randn(3, 32) * 0.5  # a hidden state mid-stream
    names = [*OUTPUT_NAMES, *(f"new_{n}" for n in STATE_NAMES)]
    with torch.no_grad():
        ref = dict(zip(names, CPCStep(model, 4, 8)(audio, *state.values()), strict=True))
        got = dict(zip(names, CPCStep(model, 4, 8, ar_as_matmuls=True)(audio, *state.values()), strict=True))
    assert torch.allclose(got["c"], ref["c"], atol=1e-6) and torch.allclose(
        got["new_gru_h"], ref["new_gru_h"], atol=1e-6
    )


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory):
    """A 128/128 channel-norm model (every weight matrix has >= 128 input rows, so all are quantised),
    exported as fp32 and as int8 at F=10."""
    cfg = config.load(None, ["model.enc_dim=128", "model.ctx_dim=128", "model.n_steps=4"])
    torch.manual_seed(1)
    model = CPC(cfg.model).eval()
    out = tmp_path_factory.mktemp("int8")
    for weights in ("fp32", "int8"):
        export_onnx(model, cfg, 0, out / f"{weights}.onnx", 10, 16, weights)
    return model, out / "fp32.onnx", out / "int8.onnx"


def test_int8_variant_quantises_every_big_matrix_and_says_so(int8_pair):
    _, fp32, int8 = int8_pair
    proto = onnx.load(str(int8))
    ops = [n.op_type for n in proto.graph.node]
    blockwise = {n.input[1] for n in proto.graph.node if n.op_type == "MatMulNBits"}
    # At F=10 convs 2-5 give >= 4 rows per call: row-wise uint8 x int8 integer GEMMs, each input row
    # quantised by one QuantizeLinear block. The GRU's input and hidden products and the predictor (all
    # K = 4 steps in one product): block-wise 8-bit weights. conv1 (10 input rows) stays float.
    assert ops.count("MatMulInteger") == 4 and ops.count("QuantizeLinear") == 4
    assert blockwise == {"ar_w_ih.0_Q8", "ar_w_hh.0_Q8", "pred_w_Q8"}
    # Float products left: conv1, the scores against the z ring, and the sum of the exponentiated
    # scores over each frame's window.
    assert "GRU" not in ops and ops.count("MatMul") == 3
    assert OnnxModel(int8).info.weights == "int8" and OnnxModel(fp32).info.weights == "fp32"
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size


def test_int8_variant_stays_within_its_stated_tolerance_over_a_long_stream(int8_pair):
    """30 s of real speech in one stream (3000 frames, state threaded through 300 calls): the int8 graph
    stays within TOLERANCE_INT8 of the offline float model from the first frame to the last, no drift,
    and it really is quantised (it differs by more than float rounding)."""
    model, _, int8 = int8_pair
    speech = np.concatenate([load_audio(f, 16000) for f in sorted(glob.glob(str(MINI / "*/*/*/*.flac")))])
    audio = speech[None, : 300 * 1600]
    diffs = compare(int8, model, audio)
    assert all(diffs[k] <= proof.TOLERANCE_INT8[k] for k in diffs), diffs
    assert diffs["c"] > 1e-4, diffs
    late = compare(int8, model, audio[:, -50 * 1600 :])  # the last 5 s, restarted: same error level
    assert diffs["c"] < 3 * late["c"] + 1e-3, (diffs, late)


def test_loader_reads_weights_key_and_refuses_unknown_kinds(tmp_path, int8_pair):
    _, fp32, _ = int8_pair
    proto = onnx.load(str(fp32))
    for value, expect in (("int4", "weights 'int4' unknown"), (None, None)):
        kept = [p for p in proto.metadata_props if p.key != "weights"]
        del proto.metadata_props[:]
        proto.metadata_props.extend(kept)
        if value:
            proto.metadata_props.add(key="weights", value=value)
        onnx.save(proto, str(tmp_path / "m.onnx"))
        if expect:
            with pytest.raises(UserError, match=expect):
                OnnxModel(tmp_path / "m.onnx")
        else:  # graphs exported before the key existed are float32
            assert OnnxModel(tmp_path / "m.onnx").info.weights == "fp32"


def test_cli_int8_is_proved_against_its_own_tolerance(tmp_path, trained, capsys, monkeypatch):
    _, _, ckpt = trained
    out = tmp_path / "q.onnx"
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--check-calls", "30", "--weights", "int8"]
    assert cli.main(args) == 0
    assert "wrote int8 graph" in capsys.readouterr().out and out.is_file()
    out.unlink()
    monkeypatch.setattr(proof, "TOLERANCE_INT8", {"z": 1e-5, "c": 1e-5, "scores": 1e-5, "logprob": 1e-5})
    assert cli.main(args) == 2
    assert "streaming graph differs from the offline model" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_check_proves_an_existing_graph_of_the_checkpoint(tmp_path, trained, capsys):
    """`cpc-export --check` runs the proof on a graph already written (the same check lines) and exits 0;
    a graph that differs from the checkpoint's model is refused with exit 2."""
    _, _, ckpt = trained
    graph_file = tmp_path / "m.onnx"
    assert (
        cli.main(
            [
                "--checkpoint",
                str(ckpt),
                "--out",
                str(graph_file),
                "--frames-per-call",
                "2",
                "--check-calls",
                "20",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["--checkpoint", str(ckpt), "--check", str(graph_file), "--check-calls", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpc-export: checking fp32 graph: F=2 W=128 dims 64/32 K=5, step 15")
    assert lines[1].startswith("cpc-export: check random: 3 streams x 20 calls: max |diff| z=")
    assert lines[2].startswith("cpc-export: check speech: 3 streams x 20 calls: max |diff| z=")
    assert lines[3] == f"cpc-export: ok: {graph_file} equals {ckpt}"
    proto = onnx.load(str(graph_file))  # the same metadata, other weights: the proof itself must fail
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    weight.raw_data = (np.frombuffer(weight.raw_data, np.float32) * 1.5).astype(np.float32).tobytes()
    onnx.save(proto, str(graph_file))
    assert cli.main(["--checkpoint", str(ckpt), "--check", str(graph_file), "--check-calls", "20"]) == 2
    assert "streaming graph differs from the offline model: random z" in capsys.readouterr().err


def test_killed_export_leaves_nothing_in_the_output_folder(tmp_path, trained):
    """The graph is written and proved in a private temporary folder and copied to --out only when
    proved: SIGKILL during the proof leaves the output folder as it was (no hidden temporary)."""
    _, _, ckpt = trained
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "cpc_export.cli", "--checkpoint", str(ckpt), "--out", str(out / "m.onnx"),
           "--check-calls", "10000"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    first = proc.stdout.readline()  # "wrote ...": the graph exists, the proof runs
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.startswith("cpc-export: wrote fp32 graph") and proc.returncode == -signal.SIGKILL
    assert list(out.iterdir()) == []


def test_stream_batch_runs_any_subset_of_rows_as_if_they_were_alone(small_onnx):
    """Prefixes of the batch (bound in place), other subsets (gathered and scattered) and full calls, in
    any order: each stream's outputs equal those of its own OnnxModel.step run, bit for bit, and streams
    that sit out a call keep their state."""
    path, model = small_onnx
    runtime = OnnxModel(path, providers="cpu")
    n = runtime.info.samples_per_call
    audio = check_streams(model, UTT_1089, 40, n)  # 3 streams
    audio = np.concatenate([audio, audio[::-1, ::-1].copy()])  # 6 streams
    alone = [runtime.zero_state(1) for _ in range(6)]
    batch, calls = StreamBatch(runtime, 6), [0] * 6
    rng = np.random.default_rng(0)
    for i in range(60):
        rows = [[0, 1, 2], [0], list(range(6)), [1, 3, 4], [5, 2], [0, 1, 2, 3]][i % 6] if i % 7 else sorted(
            rng.choice(6, size=int(rng.integers(1, 7)), replace=False).tolist())  # fmt: skip
        chunk = np.stack([audio[r, calls[r] * n : (calls[r] + 1) * n] for r in rows])
        got = batch.step(chunk, rows=rows)
        for j, r in enumerate(rows):
            want, alone[r] = runtime.step(chunk[j : j + 1], alone[r])
            for k in want:
                assert np.array_equal(got[k][j : j + 1], want[k], equal_nan=True), (i, rows, r, k)
            calls[r] += 1
    for r in range(6):
        for k, v in alone[r].items():
            assert np.array_equal(batch.state[k][r : r + 1], v), (r, k)
