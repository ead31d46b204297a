"""LibriSpeech walker, CPC split/label parsers and batch sampling, on the bundled real utterances."""

import shutil

import numpy as np
import pytest
import soundfile as sf
from conftest import MINI, UTT_2911, UTT_4051
from cpc_training.data import (
    WindowBatches,
    check_labels,
    phone_label_count,
    read_phone_labels,
    read_split,
    scan_librispeech,
    select_ids,
)

from cpc_stream.errors import UserError


def test_scan_finds_every_bundled_utterance_with_speaker_and_length():
    utts, skipped = scan_librispeech(MINI, "train-clean-100")
    assert skipped == 0 and len(utts) == 9
    assert {u.speaker for u in utts} == {"2911", "4051", "4397", "5393", "5678", "6476"}
    u = next(u for u in utts if u.id == "4051-11218-0044")
    assert u.samples == sf.info(str(UTT_4051)).frames and u.path == UTT_4051


def test_phone_labels_parse_and_frame_counts_match_the_audio():
    labels = read_phone_labels(MINI / "phone_labels.txt")
    assert len(labels) == 6
    assert all(lab.min() >= 0 and lab.max() < 41 for lab in labels.values())
    for path in (UTT_4051, UTT_2911):
        n = sf.info(str(path)).frames
        assert len(labels[path.stem]) == phone_label_count(n)
    utts, _ = scan_librispeech(MINI, "train-clean-100")
    chosen = select_ids(utts, ["4051-11218-0044", "2911-12359-0007"], "test split")
    check_labels(chosen, labels, "test split")  # does not raise
    with pytest.raises(UserError, match=r"1 utterances have no phone labels \(first: 5393-19218-0024\)"):
        check_labels(select_ids(utts, ["5393-19218-0024"], "s"), labels, "s")


def test_split_ids_without_audio_are_named(tmp_path):
    split = tmp_path / "train_split.txt"
    split.write_text("4051-11218-0044\n9999-1-0001\n\n")
    assert read_split(split) == ["4051-11218-0044", "9999-1-0001"]
    utts, _ = scan_librispeech(MINI, "train-clean-100")
    with pytest.raises(UserError, match=r"1 of 2 ids have no audio .*first: 9999-1-0001"):
        select_ids(utts, read_split(split), str(split))


def _copy_speaker(tmp_path):
    root = tmp_path / "ls"
    shutil.copytree(MINI / "train-clean-100" / "5678", root / "train-clean-100" / "5678")
    return root


def test_corrupt_file_is_skipped_and_counted(tmp_path, caplog):
    root = _copy_speaker(tmp_path)
    bad = root / "train-clean-100/5678/43301/5678-43301-9999.flac"
    bad.write_bytes(b"fLaC" + b"\x00garbage" * 100)
    utts, skipped = scan_librispeech(root, "train-clean-100")
    assert skipped == 1 and len(utts) == 3
    assert "5678-43301-9999.flac" in caplog.text


@pytest.mark.parametrize(
    "rate, channels, message", [(8000, 1, "sample rate 8000 Hz"), (16000, 2, "2 channels")]
)
def test_wrong_rate_or_stereo_is_a_one_line_error_naming_the_file(tmp_path, rate, channels, message):
    root = _copy_speaker(tmp_path)
    sf.write(root / "train-clean-100/5678/43301/5678-43301-0001.flac", np.zeros((rate, channels)), rate)
    with pytest.raises(UserError, match=f"5678-43301-0001.flac: {message}"):
        scan_librispeech(root, "train-clean-100")


def test_missing_root_and_empty_subset_are_errors(tmp_path):
    with pytest.raises(UserError, match="dataset root .*nope is not a directory"):
        scan_librispeech(tmp_path / "nope", "train-clean-100")
    (tmp_path / "train-clean-100").mkdir()
    with pytest.raises(UserError, match="no readable .flac files under"):
        scan_librispeech(tmp_path, "train-clean-100")
    with pytest.raises(UserError, match="subset folder .*dev-other not found"):
        scan_librispeech(tmp_path, "dev-other")


def test_batches_are_a_pure_function_of_step_and_same_speaker_holds_one_speaker():
    utts, _ = scan_librispeech(MINI, "train-clean-100")
    mixed = WindowBatches(utts, 3200, 8, "mixed", seed=3)
    a, spk_a = mixed[5]
    b, _ = WindowBatches(utts, 3200, 8, "mixed", seed=3)[5]
    assert a.shape == (8, 3200) and np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), mixed[6][0].numpy())
    same = WindowBatches(utts, 3200, 8, "same_speaker", seed=3)
    speakers_per_batch = [len(set(same[s][1].tolist())) for s in range(20)]
    assert speakers_per_batch == [1] * 20
    assert len({int(same[s][1][0]) for s in range(20)}) > 1  # different speakers across batches
    assert len({int(s) for step in range(20) for s in mixed[step][1]}) == 6
