"""cpc-features: offline z, c and scores for any audio file, from a checkpoint."""

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from conftest import MINI, UTT_4051
from cpc_training import config, features, train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("f")
    cfg = config.load(None, [f"data.root={MINI}", "model.enc_dim=32", "model.ctx_dim=16", "model.n_steps=3",
                             "data.window=3200", "data.workers=0", "negatives.count=8", "train.max_steps=2",
                             f"train.out_dir={out}"])  # fmt: skip
    train.train(cfg, quiet=True)
    return out / "checkpoint.pt"


def test_features_of_a_stereo_44k_file_are_those_of_its_16k_mono_mix(tmp_path, ckpt, capsys):
    mono, sr = sf.read(str(UTT_4051), dtype="float32", frames=16000 * 3)
    hi = soxr.resample(mono, sr, 44100)
    stereo = np.stack([hi, 0.5 * hi], axis=1)
    src = tmp_path / "stereo.wav"
    sf.write(src, stereo, 44100, subtype="PCM_24")
    assert features.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), str(src)]) == 0
    got = np.load(tmp_path / "o" / "stereo.npz")
    model, _ = train.model_from_checkpoint(train.load_checkpoint(ckpt))
    expect = soxr.resample(sf.read(str(src), dtype="float32")[0].mean(axis=1), 44100, 16000)
    with torch.no_grad():
        z, c = model(torch.from_numpy(expect.astype(np.float32))[None])
    assert got["c"].shape == (len(expect) // 160, 16) and got["z"].shape[1] == 32
    assert np.abs(got["c"] - c[0].numpy()).max() < 1e-6
    assert got["scores"].shape == (len(expect) // 160, 3) and np.isnan(got["scores"][0]).all()
    assert "stereo.npz: 300 frames" in capsys.readouterr().out  # 3 s = 300 frames of 10 ms


def test_an_unreadable_file_is_reported_and_the_others_still_written(tmp_path, ckpt, capsys):
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"nope")
    code = features.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), str(bad), str(UTT_4051)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read audio file" in err and "1 of 2 files could not be read" in err
    assert (tmp_path / "o" / "4051-11218-0044.npz").is_file()
