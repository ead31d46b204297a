"""Shared fixtures: the bundled real LibriSpeech utterances (data/librispeech-mini, CC BY 4.0)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "data" / "librispeech-mini"
UTT_4051 = MINI / "train-clean-100/4051/11218/4051-11218-0044.flac"
UTT_2911 = MINI / "train-clean-100/2911/12359/2911-12359-0007.flac"
UTT_1089 = MINI / "test-clean/1089/134686/1089-134686-0001.flac"


@pytest.fixture(autouse=True)
def _few_threads():
    """Two cores here: keep torch from oversubscribing when tests run alongside worker processes."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)
