"""cpc-synth and cpc-eval: a labelled synthetic corpus, the probes, the ablation grid and the figures."""

import json

import numpy as np
import pytest
import soundfile as sf
from cpc_training import config, synth, train
from cpc_training import eval as cpc_eval
from cpc_training.data import phone_label_count, read_phone_labels, read_split, scan_librispeech

from cpc_stream.errors import UserError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    try:
        synth.find_espeak()
    except UserError as e:  # no libespeak-ng: neither the espeakng-loader wheel nor the system's
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("synth")
    stats = synth.generate(out, speakers=3, utterances=10, seed=1)
    return out, stats


@pytest.fixture(scope="module")
def tiny_ckpt(corpus, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("ck")
    cfg = config.load(None, [f"data.root={root}", f"data.train_split={root / 'train_split.txt'}", "model.enc_dim=32",
                             "model.ctx_dim=16", "model.n_steps=3", "data.window=3200", "data.workers=0",
                             "negatives.count=8", "train.max_steps=3", f"train.out_dir={out}"])  # fmt: skip
    train.train(cfg, quiet=True)
    return out / "checkpoint.pt"


def test_synthetic_corpus_is_librispeech_layout_with_cpc_labels(corpus):
    root, stats = corpus
    utts, skipped = scan_librispeech(root, "train-clean-100")
    assert skipped == 0 and len(utts) == 30 and len({u.speaker for u in utts}) == 3
    labels = read_phone_labels(root / "converted_aligned_phones.txt")
    for u in utts:
        assert len(labels[u.id]) == phone_label_count(u.samples)
        assert labels[u.id].max() > 0  # speech, not only silence
    train_ids, test_ids = read_split(root / "train_split.txt"), read_split(root / "test_split.txt")
    assert len(train_ids) == 24 and len(test_ids) == 6 and not set(train_ids) & set(test_ids)
    assert {i.split("-")[0] for i in test_ids} == {u.speaker for u in utts}
    assert stats["phones"] == len((root / "phones.txt").read_text().splitlines())
    assert (root / "espeak-ng.txt").read_text() == stats["espeak"] + "\n"
    assert stats["espeak"].startswith("espeak-ng ") and synth.find_espeak()[2] in stats["espeak"]
    assert sf.info(str(utts[0].path)).samplerate == 16000


def test_mfcc_frames_follow_the_label_framing():
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    m = cpc_eval.mfcc(wav)
    assert m.shape == (phone_label_count(16000), 39)


def test_pairing_delays_causal_frames_by_the_label_delay():
    feats = [np.arange(10, dtype=np.float32)[:, None]]
    labels = [np.arange(100, 108)]
    x, y = cpc_eval.paired(feats, labels, delay=2, stride=1)
    assert x[:, 0].tolist() == [2, 3, 4, 5, 6, 7, 8, 9] and y.tolist() == list(range(100, 108))
    x, y = cpc_eval.paired(feats, labels, delay=2, stride=3)
    assert x[:, 0].tolist() == [2, 5, 8] and y.tolist() == [100, 103, 106]
    # mfcc-causal: frames lag their labels by 4; the first 4 labels have no frame and are dropped.
    x, y = cpc_eval.paired(feats, labels, delay=cpc_eval.MFCC_DELAY["mfcc-causal"], stride=1)
    assert x[:, 0].tolist() == [0, 1, 2, 3] and y.tolist() == [104, 105, 106, 107]


def test_causal_mfcc_hears_no_audio_beyond_what_c_t_has_heard():
    """MFCC frame j's deltas span windows j-4..j+4, the last ending at sample 160 (j + 4) + 400; c_{i+d}
    has heard samples < 160 (i + d + 1). Paired with label i, mfcc-causal must end no later."""
    j_minus_i = cpc_eval.MFCC_DELAY["mfcc-causal"]
    mfcc_reach = 160 * (j_minus_i + 4) + 400  # relative to label i's first sample
    c_reach = 160 * (2 + 1)  # default --label-delay 2
    assert mfcc_reach <= c_reach and cpc_eval.MFCC_DELAY["mfcc"] == 0


def data_args(root, *extra):
    return ["--root", str(root), "--train-split", str(root / "train_split.txt"), "--test-split",
            str(root / "test_split.txt"), "--phones", str(root / "converted_aligned_phones.txt"), *extra]  # fmt: skip


def test_table_compares_cpc_with_both_baselines(corpus, tiny_ckpt, tmp_path, capsys):
    root, stats = corpus
    out = tmp_path / "r.json"
    assert cpc_eval.main(["table", *data_args(root, "--checkpoint", str(tiny_ckpt), "--json", str(out),
                                              "--baselines", "random,mfcc,mfcc13,mfcc-causal",
                                              "--save-probes", str(tmp_path / "probes"))]) == 0  # fmt: skip
    text = capsys.readouterr().out
    for row in ("Random initialization", "MFCC features", "MFCC, no deltas", "MFCC, c_t's look-ahead", "CPC"):
        assert row in text
    res = json.loads(out.read_text())
    assert set(res["accuracy"]) == {"cpc", "random", "mfcc", "mfcc13", "mfcc-causal"}
    for accs in res["accuracy"].values():
        assert set(accs) == {"phone", "speaker"} and all(0 <= a <= 1 for a in accs.values())
    assert res["accuracy"]["mfcc"]["speaker"] > 1 / 3  # MFCC separates espeak voices better than chance
    assert res["speakers"] == 3 and res["phone_classes"] == stats["phones"]
    assert (tmp_path / "probes" / "cpc_speaker_probe.npz").is_file()


def test_phone_probe_needs_labels_and_matching_speakers(corpus, tmp_path, capsys):
    root, _ = corpus
    args = data_args(root)[:-2]  # no --phones
    assert cpc_eval.main(["phone", *args, "--baselines", "mfcc"]) == 2
    assert "needs --phones" in capsys.readouterr().err
    other = tmp_path / "test.txt"
    other.write_text("100-1000-0004\n999-1-0001\n")
    args = data_args(root, "--baselines", "mfcc")
    args[args.index("--test-split") + 1] = str(other)
    assert cpc_eval.main(["speaker", *args]) == 2
    assert "1 of 2 ids have no audio" in capsys.readouterr().err


@pytest.mark.slow
def test_ablation_grid_trains_and_probes_every_row(corpus, tmp_path, capsys):
    root, _ = corpus
    overrides = [f"data.root={root}", f"data.train_split={root / 'train_split.txt'}", "model.enc_dim=16", "model.ctx_dim=8",
                 "data.window=3200", "data.batch_size=4", "data.workers=0", "negatives.count=4", "train.max_steps=2"]  # fmt: skip
    assert cpc_eval.main(["ablate", *data_args(root, "--baselines", ""), "--config", "config.yaml",
                          "--grid", "negatives", "--out", str(tmp_path), *overrides]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["name"] for r in rows] == ["mixed speaker", "same speaker", "mixed speaker (excl.)",
                                         "same speaker (excl.)", "current sequence only"]  # fmt: skip
    saved = config.load(tmp_path / "same_speaker_excl" / "config.yaml")
    assert (saved.data.batching, saved.negatives.source) == ("same_speaker", "batch_excl_current")
    assert "current sequence only" in (tmp_path / "ablation.txt").read_text()


def test_plots_write_figure_3_and_the_tsne(corpus, tiny_ckpt, tmp_path):
    root, _ = corpus
    assert (
        cpc_eval.main(["plots", *data_args(root, "--checkpoint", str(tiny_ckpt), "--out", str(tmp_path))])
        == 0
    )
    for name in ("fig3_per_k_accuracy.png", "fig2_tsne_speakers.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((tmp_path / "per_k_accuracy.json").read_text())["accuracy"]) == 3
