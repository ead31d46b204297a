"""LibriSpeech as distributed, the CPC paper's split and phone-label files, and training batches.

Layout: <root>/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac (16 kHz mono), read with
soundfile. Only an index (path, speaker, length) is held in memory; each training window is decoded from
disk when a batch is built, so memory does not grow with the dataset (train-clean-100 is about 11 GB as
int16 samples; its index is a few MB).

Batches are a pure function of (seed, step, rank): a resumed run sees exactly the batches it would have
seen, with no sampler state to save.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from cpc_stream.errors import UserError

from .config import HOP, SAMPLE_RATE

log = logging.getLogger("cpc.data")


@dataclass(frozen=True)
class Utterance:
    id: str  # e.g. "4051-11218-0044"
    path: Path
    speaker: str
    samples: int


def scan_librispeech(root: str | Path, subset: str) -> tuple[list[Utterance], int]:
    """Index every .flac under <root>/<subset>. Returns the utterances (sorted by id) and the number of
    unreadable files that were skipped with a warning. A file at another rate or with several channels is
    an error: the dataset is not what the model expects."""
    base = Path(root) / subset
    if not Path(root).is_dir():
        raise UserError(f"dataset root {root} is not a directory")
    if not base.is_dir():
        raise UserError(f"subset folder {base} not found (data.root={root}, data.subset={subset})")
    utts, skipped = [], 0
    for path in sorted(base.glob("*/*/*.flac")):
        try:
            info = sf.info(os.fsencode(path))
        except (sf.LibsndfileError, RuntimeError) as e:
            skipped += 1
            log.warning("skipping unreadable audio file %s: %s", path, str(e).split("\n")[0])
            continue
        if info.samplerate != SAMPLE_RATE:
            raise UserError(f"{path}: sample rate {info.samplerate} Hz, expected {SAMPLE_RATE}")
        if info.channels != 1:
            raise UserError(f"{path}: {info.channels} channels, expected mono")
        utts.append(Utterance(path.stem, path, path.parts[-3], info.frames))
    if not utts:
        raise UserError(f"no readable .flac files under {base}")
    if skipped:
        log.warning("skipped %d unreadable file(s) under %s", skipped, base)
    return utts, skipped


def read_split(path: str | Path) -> list[str]:
    """The CPC paper's train_split.txt / test_split.txt: one utterance id per line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"split file {p} not found")
    ids = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not ids:
        raise UserError(f"split file {p} is empty")
    return ids


def read_phone_labels(path: str | Path) -> dict[str, np.ndarray]:
    """converted_aligned_phones.txt: `<utt-id> <label> <label> ...`, one integer per 10 ms frame
    (25 ms window, 10 ms hop: an utterance of N samples has (N - 400) // 160 + 1 labels)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"phone label file {p} not found")
    labels = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            labels[parts[0]] = np.array([int(x) for x in parts[1:]], dtype=np.int64)
        except ValueError:
            raise UserError(f"{p}:{n}: labels of {parts[0]} must be integers") from None
    if not labels:
        raise UserError(f"phone label file {p} is empty")
    return labels


def phone_label_count(samples: int) -> int:
    """Number of labels converted_aligned_phones.txt has for an utterance of `samples` samples."""
    return (samples - 400) // HOP + 1


def select_ids(utts: list[Utterance], ids: list[str], what: str) -> list[Utterance]:
    """The utterances named by `ids` (a split file's content). Ids with no audio are an error that names
    how many and the first few."""
    by_id = {u.id: u for u in utts}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UserError(
            f"{what}: {len(missing)} of {len(ids)} ids have no audio under the dataset root "
            f"(first: {', '.join(missing[:3])})"
        )
    return [by_id[i] for i in ids]


def check_labels(utts: list[Utterance], labels: dict[str, np.ndarray], what: str) -> None:
    """Every utterance must have labels, and as many as its length implies (one frame of tolerance)."""
    missing = [u.id for u in utts if u.id not in labels]
    if missing:
        raise UserError(
            f"{what}: {len(missing)} utterances have no phone labels (first: {', '.join(missing[:3])})"
        )
    for u in utts:
        want = phone_label_count(u.samples)
        if abs(len(labels[u.id]) - want) > 1:
            raise UserError(f"{what}: {u.id} has {len(labels[u.id])} labels, its audio implies {want}")


class WindowBatches(torch.utils.data.Dataset):
    """Item `step` is the training batch of that step: (wav (batch, window) float32, speaker (batch,) int64).

    mixed batching draws each window from an utterance chosen in proportion to its length; same_speaker
    first draws one speaker (in proportion to their audio) and takes all windows from that speaker.
    """

    def __init__(
        self, utts: list[Utterance], window: int, batch_size: int, batching: str, seed: int, rank: int = 0
    ):
        self.utts = [u for u in utts if u.samples >= window]
        if not self.utts:
            raise UserError(f"no utterance is as long as data.window={window} samples")
        self.window, self.batch_size, self.batching = window, batch_size, batching
        self.seed, self.rank = seed, rank
        self.speakers = sorted({u.speaker for u in self.utts})
        self.speaker_index = {s: i for i, s in enumerate(self.speakers)}
        weights = np.array([u.samples - window + 1 for u in self.utts], dtype=np.float64)
        self.p_utt = weights / weights.sum()
        by_spk = {s: [i for i, u in enumerate(self.utts) if u.speaker == s] for s in self.speakers}
        self.spk_utts = [np.array(by_spk[s]) for s in self.speakers]
        spk_w = np.array([weights[ix].sum() for ix in self.spk_utts])
        self.p_spk = spk_w / spk_w.sum()
        self.bad_reads = 0

    def __len__(self) -> int:
        return 2**62  # indexed by step; the sampler decides which steps are drawn

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, self.rank])
        pool, p = np.arange(len(self.utts)), self.p_utt
        if self.batching == "same_speaker":
            pool = self.spk_utts[rng.choice(len(self.speakers), p=self.p_spk)]
            p = self.p_utt[pool] / self.p_utt[pool].sum()
        wav = np.empty((self.batch_size, self.window), dtype=np.float32)
        spk = np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            for _attempt in range(10):
                u = self.utts[int(rng.choice(pool, p=p))]
                start = int(rng.integers(0, u.samples - self.window + 1))
                try:
                    x, _ = sf.read(os.fsencode(u.path), start=start, frames=self.window, dtype="float32")
                except (sf.LibsndfileError, RuntimeError) as e:
                    self.bad_reads += 1
                    log.warning("skipping window of %s (decode error: %s)", u.path, str(e).split("\n")[0])
                    continue
                if len(x) == self.window:
                    break
                self.bad_reads += 1
                log.warning("skipping window of %s: file shorter than its header says", u.path)
            else:
                raise UserError(
                    f"10 windows in a row failed to decode at step {step}: is the dataset corrupt?"
                )
            wav[i], spk[i] = x, self.speaker_index[u.speaker]
        return torch.from_numpy(wav), torch.from_numpy(spk)
