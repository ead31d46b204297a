"""Imported CPC_audio checkpoints stream exactly what CPC_audio computes offline.

The oracle is CPC_audio itself (../shared/peers/CPC_audio: MIT, unmodified, PROVENANCE.md): its own
getEncoder / getAR / CPCModel build the models, from get_default_cpc_config() (the Libri-light 60k model's
configuration: LSTM, layerNorm, 256 channels, transformer predictors) and from variants; the checkpoints
are written as CPC_audio writes them (the released {"config", "weights"}, and save_checkpoint's
checkpoint_N.pt beside checkpoint_args.json); its CPCModel.forward and PredictionNetwork compute the
reference. cpc-export imports each checkpoint and the streamed frames, fed in random chunk sizes, must
equal CPC_audio's within 1e-4 on every frame. Where the folder is absent (a user's clone) the oracle's
tests skip, saying so; the rest run everywhere.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, UTT_1089, UTT_4051, collect, frames_of, start_daemon
from cpc_export import cli
from cpc_training.checkpoint import load_model
from cpc_training.cpc_audio import DEFAULTS, LOOKAHEAD, CPCAudio, CPCAudioConfig

from cpc_stream.audio import load_audio
from cpc_stream.client import Subscriber
from cpc_stream.errors import UserError
from cpc_stream.onnx_model import ChunkedStream, OnnxModel

PEER = REPO.parent / "shared" / "peers" / "CPC_audio"
oracle = pytest.mark.skipif(not PEER.is_dir(), reason=f"CPC_audio's code, the oracle, is not at {PEER}")
TOLERANCE = 1e-4  # max |diff| of c and z against CPC_audio, every frame


@pytest.fixture(scope="module")
def peer():
    """CPC_audio's modules, imported from the peer folder with empty stand-ins for torchaudio and
    progressbar (PROVENANCE.md), and its own `transformers` module where its criterion imports one."""
    sys.path.insert(0, str(PEER))
    for name in ("torchaudio", "progressbar"):
        sys.modules.setdefault(name, types.ModuleType(name))
    from cpc import feature_loader, model
    from cpc.cpc_default_config import get_default_cpc_config
    from cpc.criterion import CPCUnsupersivedCriterion

    return types.SimpleNamespace(
        defaults=get_default_cpc_config, getEncoder=feature_loader.getEncoder, getAR=feature_loader.getAR,
        CPCModel=model.CPCModel, Criterion=CPCUnsupersivedCriterion, save_checkpoint=feature_loader.save_checkpoint,
    )  # fmt: skip


def build(peer, seed: int = 0, **changes) -> tuple[argparse.Namespace, torch.nn.Module, torch.nn.Module]:
    """A CPC_audio model and its CPC criterion from the default config with `changes`, built by CPC_audio's
    own code. Its norms get random affines and batch statistics, as a trained model's are, so that a
    wrong fold or variance shows."""
    args = peer.defaults()
    for key, value in changes.items():
        setattr(args, key, value)
    torch.manual_seed(seed)
    model = peer.CPCModel(peer.getEncoder(args), peer.getAR(args))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "batchNorm" in name:
                p.add_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "running_mean" in name:
                b.copy_(0.1 * torch.randn_like(b))
            elif "running_var" in name:
                b.copy_(0.5 + torch.rand_like(b))
    # CPC_audio's criterion imports its transformer predictors as a top-level `transformers` module.
    cpc_transformers = __import__("cpc.transformers", fromlist=["buildTransformerAR"])
    saved, sys.modules["transformers"] = sys.modules.get("transformers"), cpc_transformers
    try:
        criterion = peer.Criterion(args.nPredicts, args.hiddenGar, args.hiddenEncoder, args.negativeSamplingExt,
                                   mode=args.cpc_mode, rnnMode=args.rnnMode, sizeInputSeq=args.sizeWindow // 160)  # fmt: skip
    finally:
        if saved is None:
            del sys.modules["transformers"]
        else:
            sys.modules["transformers"] = saved
    return args, model.eval(), criterion.eval()


def save(peer, folder: Path, kind: str, args, model, criterion) -> Path:
    """Write the checkpoint as CPC_audio does: released ({"config": vars(args), "weights": state_dict},
    hubconf.py's) or training (save_checkpoint's checkpoint_N.pt beside checkpoint_args.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "released":
        path = folder / "released.pt"
        torch.save({"config": vars(args), "weights": model.state_dict()}, path)
        return path
    path = folder / "checkpoint_4.pt"
    optimizer = torch.optim.Adam([*criterion.parameters(), *model.parameters()], lr=args.learningRate)
    peer.save_checkpoint(model.state_dict(), criterion.state_dict(), optimizer.state_dict(), None, str(path))
    (folder / "checkpoint_args.json").write_text(json.dumps(vars(args), indent=2))
    return path


VARIANTS = {  # name: CPC_audio arguments changed from its defaults
    "60k": {},  # the Libri-light 60k model's configuration
    "gru2-batchnorm": {"arMode": "GRU", "nLevelsGRU": 2, "normMode": "batchNorm"},
    "linear": {"rnnMode": "linear"},  # linear k-step predictors: the graph has scores
}


@pytest.fixture(scope="module")
def imported(peer, tmp_path_factory):
    """get(variant, format, F) -> (CPC_audio's model, its criterion, the graph cpc-export wrote from the
    checkpoint in that format at F frames per call), each made once."""
    root, made = tmp_path_factory.mktemp("cpc_audio"), {}

    def get(variant: str, kind: str, frames: int):
        if (variant, kind, frames) not in made:
            args, model, criterion = build(peer, **VARIANTS[variant])
            ckpt = save(peer, root / f"{variant}-{kind}", kind, args, model, criterion)
            graph = root / f"{variant}-{kind}-f{frames}.onnx"
            argv = ["--checkpoint", str(ckpt), "--out", str(graph), "--frames-per-call", str(frames)]
            assert cli.main([*argv, "--check-calls", "20"]) == 0
            made[variant, kind, frames] = model, criterion, graph, ckpt
        return made[variant, kind, frames]

    return get


@functools.cache
def runtime(graph: Path) -> OnnxModel:
    """The graph in onnxruntime, loaded once per test run."""
    return OnnxModel(graph, providers="cpu")


def stream(graph: Path, wav: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """wav through ChunkedStream in random chunks of 1..4000 samples, then finish(): every frame."""
    chunked, rng, pieces, pos = ChunkedStream(runtime(graph)), np.random.default_rng(seed), [], 0
    while pos < len(wav):
        size = int(rng.integers(1, 4000))
        pieces.append(chunked.feed(wav[pos : pos + size]))
        pos += size
    pieces.append(chunked.finish())
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


@torch.no_grad()
def offline(model, wav: np.ndarray) -> dict[str, np.ndarray]:
    """CPC_audio's CPCModel.forward on the whole utterance: {"c": (T, ctx_dim), "z": (T, enc_dim)}."""
    c, z, _ = model(torch.from_numpy(wav)[None, None], None)
    return {"c": c[0].numpy(), "z": z[0].numpy()}


@oracle
def test_defaults_are_cpc_audios_own(peer):
    """The importer's defaults for CPC_audio's arguments are CPC_audio's: a released checkpoint's config
    may leave any of them out (hubconf.py fills them in from get_default_cpc_config())."""
    defaults = vars(peer.defaults())
    assert DEFAULTS == {k: defaults[k] for k in DEFAULTS}


@oracle
@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, kind, frames",
    [("60k", "released", 1), ("60k", "training", 4), ("gru2-batchnorm", "training", 1), ("gru2-batchnorm", "released", 4)],
)  # fmt: skip
def test_streamed_frames_equal_cpc_audios_offline_output(imported, variant, kind, frames):
    """An imported checkpoint's graph, fed 11 s of real speech in random chunk sizes, gives every frame
    of CPC_audio's own forward pass but the last, one hop late, within 1e-4: LSTM and GRU, one and two
    layers, layerNorm (unbiased variance) and batchNorm (folded), both checkpoint formats, F = 1 and 4.
    Its metadata says so: look-ahead 152 samples, format 2, c and z only, the state of its own AR."""
    model, _, graph, _ = imported(variant, kind, frames)
    info = runtime(graph).info
    ar = "gru_h,gru_h2" if variant == "gru2-batchnorm" else "lstm_h,lstm_c"
    assert (info.lookahead, info.delay, info.format_version, info.outputs) == (LOOKAHEAD, 1, 2, ("z", "c"))
    assert ",".join(info.state_names[5:-1]) == ar and info.n_steps == 0 and info.norm in ("channel", "batch")
    wav = load_audio(UTT_4051, 16000)
    got, ref = stream(graph, wav, seed=frames), offline(model, wav)
    assert len(got["c"]) == len(ref["c"]) - 1 == len(wav) // 160 - 1
    diffs = {k: float(np.abs(got[k] - ref[k][: len(got[k])]).max()) for k in ("c", "z")}
    print(
        f"{variant} {kind} F={frames}: {len(got['c'])} frames, max |diff| c={diffs['c']:.2e} z={diffs['z']:.2e}"
    )
    assert diffs["c"] <= TOLERANCE and diffs["z"] <= TOLERANCE, diffs


@oracle
@pytest.mark.slow
@pytest.mark.parametrize("frames", [1, 4])
def test_linear_predictors_stream_cpc_audios_scores(imported, frames):
    """A training checkpoint whose k-step predictors are linear (rnnMode linear) streams their scores:
    s_k(t) equals CPC_audio's own PredictionNetwork score of z_t against W_k c_{t-k} (dot / enc_dim), and
    logprob equals s_k(t) - logsumexp over the last 128 frames' z, both from CPC_audio's z and c."""
    model, criterion, graph, _ = imported("linear", "training", frames)
    info = runtime(graph).info
    assert info.outputs[2:] == ("scores", "logprob", "valid") and (info.n_steps, info.score) == (
        12,
        "dot_scaled",
    )
    wav = load_audio(UTT_1089, 16000)
    got = stream(graph, wav, seed=frames)
    n, k_max = len(got["c"]), info.n_steps
    with torch.no_grad():
        c, z, _ = model(torch.from_numpy(wav)[None, None], None)
        # CPC_audio's own scoring: candidates[k-1] = z_{t+k}, predicted from c_t, t = 0 .. T-K-1
        t_len = c.shape[1] - k_max
        candidates = [z[:, k : k + t_len].unsqueeze(1) for k in range(1, k_max + 1)]
        theirs = criterion.wPrediction(c[:, :t_len], candidates)  # K x (1, 1, t_len)
        preds = torch.stack([p(c[0]) for p in criterion.wPrediction.predictors], dim=1)  # (T, K, C)
    for k in range(1, k_max + 1):  # scores[t, k-1] compares z_t with the prediction from t - k
        t = np.arange(k, min(n, t_len + k))
        ours = got["scores"][t, k - 1]
        assert np.abs(ours - theirs[k - 1][0, 0, t - k].numpy()).max() < 1e-4, k
        assert np.isnan(got["scores"][:k, k - 1]).all() and not got["valid"][:k, k - 1].any()
    # logprob of frame t, step k: against z_{t-128} .. z_t (frames before the start left out)
    zs, worst = z[0].numpy(), 0.0
    for t in range(k_max, n, 37):
        for k in (1, k_max):
            p = preds[t - k, k - 1].numpy()
            window = zs[max(0, t - 128) : t + 1] @ p / info.enc_dim
            want = window[-1] - np.log(np.exp(window - window.max()).sum()) - window.max()
            worst = max(worst, abs(got["logprob"][t, k - 1] - want))
    assert worst < 1e-3, worst
    assert np.abs(got["c"] - c[0, :n].numpy()).max() <= TOLERANCE


@oracle
@pytest.mark.slow
def test_the_end_of_a_stream_is_every_frame_but_the_one_on_cpc_audios_padding(imported, peer):
    """n samples, T = n // 160 whole hops: the stream (any chunking, F=4, its last hops short of a call
    zero-padded by finish()) gives frames 0 .. T-2, each equal to CPC_audio's; CPC_audio gives T frames
    (T + 1 when n mod 160 = 159), the last reading its zero padding after the end where audio would be,
    so that frame, which no live stream can have, is not streamed. The one before is exact."""
    model, _, graph, _ = imported("60k", "training", 4)
    speech = load_audio(UTT_1089, 16000)
    for n in (160 * 101, 160 * 102 + 77, 160 * 103 + 151, 160 * 103 + 152, 160 * 102 + 159, 160 * 2 + 5):
        wav = speech[:n]
        got, ref = stream(graph, wav, seed=n), offline(model, wav)
        hops = n // 160
        assert len(ref["c"]) == hops + (n % 160 == 159), n
        assert len(got["c"]) == hops - 1, n
        assert np.abs(got["c"] - ref["c"][: hops - 1]).max() <= TOLERANCE, n
        assert np.abs(got["z"] - ref["z"][: hops - 1]).max() <= TOLERANCE, n
    # The frame that is not streamed really depends on the padding: with more audio it changes.
    longer, ref = offline(model, speech[: 160 * 103]), offline(model, speech[: 160 * 102])
    assert np.abs(longer["c"][101] - ref["c"][101]).max() > 10 * TOLERANCE


@oracle
def test_both_formats_hold_the_same_model_and_only_a_training_one_has_predictors(peer, tmp_path):
    """The released and the training checkpoint of one CPC_audio model load as the same weights; a
    released one holds no criterion, so even linear predictors give no scores there."""
    args, model, criterion = build(peer, **VARIANTS["linear"])
    released = load_model(save(peer, tmp_path / "r", "released", args, model, criterion))
    training = load_model(save(peer, tmp_path / "t", "training", args, model, criterion))
    assert released[0].predictor is None and training[0].predictor is not None
    assert (released[2], training[2]) == (0, 0) and released[1].model_hash() != training[1].model_hash()
    theirs = released[0].state_dict()
    for key, value in theirs.items():
        assert torch.equal(value, training[0].state_dict()[key]), key


@oracle
@pytest.mark.slow
def test_cpc_stream_serves_an_imported_60k_model_to_a_subscriber(imported):
    """import (cpc-export) -> cpc-stream --file -> Subscriber: c of every frame but the last equals
    CPC_audio's offline output within 1e-4; the metadata says c only (no scores kind) and the look-ahead;
    eos counts the frames and says no scores were sent."""
    model, _, graph, _ = imported("60k", "released", 1)
    proc, endpoint = start_daemon(graph, "--file", str(UTT_1089), "--wait-subscribers", "1")
    with Subscriber(endpoint, kinds=("c", "scores")) as sub:
        meta = sub.wait_meta(timeout=30)
        got, eos = collect(sub, 1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert (
        meta["kinds"] == ["c"] and meta["model"]["lookahead"] == LOOKAHEAD and meta["model"]["n_steps"] == 0
    )
    (name,) = meta["streams"]
    wav = load_audio(UTT_1089, 16000)
    c, ref = frames_of(got[name]["c"]), offline(model, wav)["c"]
    assert "scores" not in got[name] and eos[name]["last_seq"]["scores"] == -1
    assert len(c) == eos[name]["frames"] == len(wav) // 160 - 1
    assert [m.header["frame"] for m in got[name]["c"]] == list(range(len(c)))
    diff = float(np.abs(c - ref[: len(c)]).max())
    print(f"cpc-stream --file, 60k configuration, F=1: {len(c)} frames, max |diff| c={diff:.2e}")
    assert diff <= TOLERANCE


@oracle
@pytest.mark.slow
def test_cpc_features_and_cpc_eval_take_a_cpc_audio_checkpoint(imported, tmp_path):
    """cpc-features on a CPC_audio checkpoint, in pieces of 0.37 s, writes CPC_audio's offline frames of
    the whole file (its last frame included, as CPC_audio computes it), c and z only; cpc-eval probes it
    beside the same architecture at random init."""
    from cpc_training import eval as cpc_eval
    from cpc_training import features

    model, _, _, ckpt = imported("60k", "released", 1)
    args = ["--checkpoint", str(ckpt), "--out", str(tmp_path), "--chunk-seconds", "0.37", str(UTT_1089)]
    assert features.main(args) == 0
    got = np.load(tmp_path / f"{UTT_1089.stem}.npz")
    wav = load_audio(UTT_1089, 16000)
    ref = offline(model, wav[: len(wav) // 160 * 160])
    assert sorted(got.files) == ["c", "hop", "sample_rate", "z"] and got["c"].shape == ref["c"].shape
    assert np.abs(got["c"] - ref["c"]).max() <= TOLERANCE and np.abs(got["z"] - ref["z"]).max() <= TOLERANCE
    ns = argparse.Namespace(checkpoint=str(ckpt), baselines="random", seed=0)
    encoders = cpc_eval.encoders(ns, torch.device("cpu"))
    assert all(isinstance(encoders[k], CPCAudio) for k in ("cpc", "random"))


# -- without the oracle: what the importer refuses, and its int8 path --------------------------------------
def released(tmp_path: Path, **config) -> Path:
    """A checkpoint in CPC_audio's released format with this config (over its defaults) and no weights."""
    path = tmp_path / "released.pt"
    torch.save({"config": config, "weights": {}}, path)
    return path


@pytest.mark.parametrize(
    "config, message",
    [
        ({"arMode": "transformer"}, r"CPC_audio arMode='transformer' is not supported"),
        ({"arMode": "RNN"}, r"CPC_audio arMode='RNN' is not supported"),
        ({"arMode": "no_ar"}, r"CPC_audio arMode='no_ar' is not supported"),
        ({"cpc_mode": "reverse"}, r"CPC_audio cpc_mode='reverse' is not supported"),
        ({"cpc_mode": "bert"}, r"CPC_audio cpc_mode='bert' is not supported"),
        ({"normMode": "instanceNorm"}, r"CPC_audio normMode='instanceNorm' is not supported"),
        ({"encoder_type": "mfcc"}, r"CPC_audio encoder_type='mfcc' is not supported"),
        ({"load": ["a/checkpoint_1.pt", "b/checkpoint_2.pt"]}, r"CPC_audio load=\[.*\] concatenates several models"),
        ({"hiddenEncoder": "256"}, r"CPC_audio hiddenEncoder='256' is not a positive integer"),
        ({}, r"the weights of this CPC_audio released checkpoint do not fit its config \(LSTM \(1 layer\)"),
    ],
)  # fmt: skip
def test_configurations_it_cannot_stream_are_refused_in_one_line(tmp_path, config, message):
    """A CPC_audio checkpoint whose model is not a conv encoder + GRU/LSTM (transformer, RNN or no AR,
    reversed or bidirectional modes, instance norm, MFCC input, concatenated models) or whose weights do
    not fit its config is one line naming the key and its value, before anything is built from it."""
    with pytest.raises(UserError, match=message) as e:
        load_model(released(tmp_path, **config))
    assert "\n" not in str(e.value)


def test_a_training_checkpoint_needs_its_arguments_beside_it(tmp_path):
    path = tmp_path / "checkpoint_3.pt"
    torch.save({"gEncoder": {}, "cpcCriterion": {}, "optimizer": {}, "best": None}, path)
    with pytest.raises(UserError, match=r"training checkpoint but .*checkpoint_args\.json .* is missing"):
        load_model(path)
    (tmp_path / "checkpoint_args.json").write_text("{not json")
    with pytest.raises(UserError, match=r"checkpoint_args\.json: not readable JSON"):
        load_model(path)


@pytest.mark.slow
def test_int8_of_an_lstm_model_is_proved_against_its_tolerance(tmp_path):
    """--weights int8 on a CPC_audio model spells the LSTM out as products, quantises them, and the proof
    holds the graph to the int8 tolerance: the 60k configuration with zero conv biases passes (z 0.074,
    c 0.016 measured). (At CPC_audio's random initialisation it does not: docs/onnx-contract.md.)"""
    from cpc_export.graph import export_onnx
    from cpc_export.proof import prove

    cfg = CPCAudioConfig(enc_dim=256, ctx_dim=256, norm="channel", ar="lstm", ar_layers=1, n_steps=0)
    torch.manual_seed(0)
    model = CPCAudio(cfg).eval()
    with torch.no_grad():
        for conv in model.encoder.convs:
            conv.bias.zero_()
    export_onnx(model, cfg, 0, tmp_path / "q.onnx", 1, 128, "int8")
    prove(tmp_path / "q.onnx", model, calls=50)
    ops = {n.op_type for n in __import__("onnx").load(str(tmp_path / "q.onnx")).graph.node}
    assert "MatMulNBits" in ops and "LSTM" not in ops
