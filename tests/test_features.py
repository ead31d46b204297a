"""cpc-features: offline z, c and scores for any audio file, from a checkpoint."""

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from conftest import MINI, UTT_1089, UTT_4051
from cpc_training import checkpoint, features

from cpc_stream import files
from cpc_stream.audio import load_audio


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


def test_features_of_a_stereo_44k_file_are_those_of_its_16k_mono_mix(tmp_path, ckpt, capsys):
    mono, sr = sf.read(str(UTT_4051), dtype="float32", frames=16000 * 3)
    hi = soxr.resample(mono, sr, 44100)
    stereo = np.stack([hi, 0.5 * hi], axis=1)
    src = tmp_path / "stereo.wav"
    sf.write(src, stereo, 44100, subtype="PCM_24")
    assert features.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), str(src)]) == 0
    got = np.load(tmp_path / "o" / "stereo.npz")
    model, _ = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(ckpt))
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


LONG_UTT = MINI / "test-clean/1089/134686/1089-134686-0000.flac"  # 10.4 s, 1043 frames


@pytest.mark.parametrize("chunk_seconds", [0.05, 0.37])
def test_audio_in_pieces_gives_the_features_of_the_whole_utterance(tmp_path, ckpt, chunk_seconds):
    """cpc-features runs long files piece by piece, the state carried over (conv context, GRU state, the
    frames the scores look back on): with pieces of 5 frames (fewer than the window's 16) and of 37, the
    10 s utterance spans 209 and 29 pieces, and every output equals extract() on the whole utterance."""
    args = [
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp_path),
        "--window",
        "16",
        "--chunk-seconds",
        str(chunk_seconds),
    ]
    assert features.main([*args, str(LONG_UTT)]) == 0
    got = np.load(tmp_path / "1089-134686-0000.npz")
    model, _ = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(ckpt))
    ref = features.extract(model, load_audio(LONG_UTT, 16000), 16)
    for k in ("z", "c", "scores", "logprob"):
        assert got[k].shape == ref[k].shape and np.array_equal(np.isnan(got[k]), np.isnan(ref[k])), k
        assert np.nanmax(np.abs(got[k] - ref[k])) < 1e-5, (k, np.nanmax(np.abs(got[k] - ref[k])))
    assert got["c"].shape[0] == 1043 and int(got["hop"]) == 160 and int(got["sample_rate"]) == 16000


def test_non_finite_samples_become_zero_with_one_warning(tmp_path, ckpt, capsys):
    """NaN and Inf would make every later frame NaN (the model is causal): they are replaced with 0,
    counted and reported, and the features are those of the repaired audio."""
    wav = load_audio(UTT_1089, 16000)
    bad = wav.copy()
    bad[[100, 5000, 9000]] = [np.nan, np.inf, -np.inf]
    src = tmp_path / "x.wav"
    sf.write(src, bad, 16000, subtype="FLOAT")
    assert features.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), str(src)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"cpc-features: warning: {src}: 3 non-finite samples (NaN or Inf) replaced with 0"]
    got = np.load(tmp_path / "o" / "x.npz")
    assert np.isfinite(got["z"]).all() and np.isfinite(got["c"]).all()
    repaired = bad.copy()
    repaired[[100, 5000, 9000]] = 0
    model, _ = checkpoint.model_from_checkpoint(checkpoint.load_checkpoint(ckpt))
    assert np.abs(got["c"] - features.extract(model, repaired)["c"]).max() < 1e-5


def test_files_shorter_than_a_frame_give_zero_frames_and_the_others_are_written(tmp_path, ckpt, capsys):
    """An empty WAV and one of 100 samples (less than one 160-sample hop) each give a warning and an .npz
    of 0 frames with the right widths; the file after them is processed."""
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(tmp_path / "short.wav", np.full(100, 0.1, np.float32), 16000)
    files = [str(tmp_path / "empty.wav"), str(tmp_path / "short.wav"), str(UTT_4051)]
    assert features.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), *files]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"cpc-features: warning: {files[0]}: 0 samples at 16000 Hz, shorter than one 160-sample frame at 16000 Hz: 0 frames",
        f"cpc-features: warning: {files[1]}: 100 samples at 16000 Hz, shorter than one 160-sample frame at 16000 Hz: 0 frames",
    ]
    for name in ("empty", "short"):
        got = np.load(tmp_path / "o" / f"{name}.npz")
        assert got["z"].shape == (0, 32) and got["c"].shape == (0, 16) and got["logprob"].shape == (0, 3)
    assert np.load(tmp_path / "o" / "4051-11218-0044.npz")["c"].shape[0] > 0


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, ckpt, capsys, monkeypatch):
    """The .npz is replaced whole or not at all: a write that fails half way (here: the disk fills up
    while the arrays are copied in) is one error line, the previous file is intact and readable, and
    nothing else is left in the folder."""
    args = ["--checkpoint", str(ckpt), "--out", str(tmp_path), str(UTT_4051)]
    assert features.main(args) == 0
    before = (tmp_path / "4051-11218-0044.npz").read_bytes()

    def disk_full(src, dst, length=0):
        dst.write(src.read(1000))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.shutil, "copyfileobj", disk_full)
    assert features.main(args) == 2
    err = capsys.readouterr().err
    assert (
        f"cpc-features: error: cannot write {tmp_path / '4051-11218-0044.npz'}: No space left on device"
        in err
    )
    assert [p.name for p in tmp_path.iterdir()] == ["4051-11218-0044.npz"]
    assert (tmp_path / "4051-11218-0044.npz").read_bytes() == before
