"""cpc-synth's libespeak-ng: the espeakng-loader wheel's (bundled) first, the system's as the fallback; the
two give the same phone classes and phone sequences, with timings that agree on nearly every 10 ms frame."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from cpc_training import synth

from cpc_stream.errors import UserError


def _library(choice: str) -> str:
    """'' when libespeak-ng `choice` is there, else why not (naming the package)."""
    try:
        synth.find_espeak(choice)
    except UserError as e:
        return str(e)
    return ""


needs_bundled = pytest.mark.skipif(bool(_library("bundled")), reason=_library("bundled") or "bundled")
needs_system = pytest.mark.skipif(bool(_library("system")), reason=_library("system") or "system")


@needs_bundled
def test_the_bundled_library_is_the_default_and_says_so():
    import espeakng_loader

    path, data, source = synth.find_espeak("auto")
    assert path == espeakng_loader.get_library_path() and source.startswith("espeakng-loader ")
    assert Path(data, "espeak-ng-data") == Path(espeakng_loader.get_data_path())
    tts = synth.Espeak()
    assert tts.source == source and tts.rate == 22050 and tts.version[0].isdigit()


def test_phone_events_carry_no_stress_marks():
    """espeak-ng 1.52 prefixes stressed vowels with ' or , in its events; 1.51 does not. Dropped, so that a
    vowel is one phone class whichever library made the corpus."""
    if _library("auto"):
        pytest.skip(_library("auto"))
    tts = synth.Espeak()
    tts.voice("gmw/en-US+m1", 170, 50)
    wav, events = tts.say("the president gave a short speech about economic development")
    names = [p for _, p in events]
    assert len(wav) > tts.rate and len(names) > 30
    assert all(p and p[0] not in synth.STRESS_MARKS for p in names), names
    assert {"I", "E", "eI"} <= set(names)  # vowels that 1.52 reports as 'I, 'E, 'eI here


SAY = """
import json, sys
import numpy as np, soxr
from cpc_training import synth
tts = synth.Espeak(sys.argv[1])
rng = np.random.default_rng(3)
texts = [" ".join(rng.choice(synth.WORDS, size=10)) for _ in range(3)]
vocab, out = {}, []
for voice in ("gmw/en-US+m1", "gmw/en-GB-x-rp+f1"):
    tts.voice(voice, 170, 50)
    for text in texts:
        wav, events = tts.say(text)
        n = len(soxr.resample(wav.astype(np.float32), tts.rate, 16000))
        labels = synth.frame_labels(n, events, vocab)
        names = {i: p for p, i in vocab.items()} | {0: "SIL"}
        out.append([[p for _, p in events], [names[int(i)] for i in labels]])
print(json.dumps(out))
"""


def _say(choice: str) -> list:
    """Six utterances through one library, in a process of their own (a process loads one libespeak-ng)."""
    r = subprocess.run(
        [sys.executable, "-c", SAY, choice], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@needs_bundled
@needs_system
def test_bundled_and_system_libraries_give_the_same_phones():
    """Measured on 12 voices x 10 utterances: same phone sequences everywhere, 98.5 % of frame labels equal
    (timings differ by a few ms, at most 100 ms), 38 of 120 waveforms identical (none for the f1 variants)."""
    bundled, system = _say("bundled"), _say("system")
    agree = total = 0
    for (seq_b, lab_b), (seq_s, lab_s) in zip(bundled, system, strict=True):
        assert seq_b == seq_s
        n = min(len(lab_b), len(lab_s))
        agree += sum(a == b for a, b in zip(lab_b[:n], lab_s[:n], strict=True))
        total += max(len(lab_b), len(lab_s))
    assert agree / total > 0.95, agree / total


def test_one_process_loads_one_library():
    """Both are libespeak-ng.so.1: asking for the other after one is loaded is refused, not silently the same."""
    if _library("bundled") or _library("system"):
        pytest.skip(_library("bundled") or _library("system"))
    code = "from cpc_training import synth\nsynth.Espeak('bundled')\nsynth.Espeak('bundled')\nsynth.Espeak('system')\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "UserError: this process has loaded libespeak-ng " in r.stderr and "espeakng_loader" in r.stderr


def test_no_library_is_a_one_line_error_naming_the_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails
    monkeypatch.setattr(synth.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(UserError, match="pip install espeakng-loader .* apt-get install libespeak-ng1"):
        synth.find_espeak("auto")
    with pytest.raises(UserError, match="no bundled libespeak-ng: pip install espeakng-loader"):
        synth.find_espeak("bundled")
    with pytest.raises(UserError, match="no system libespeak-ng: apt-get install libespeak-ng1"):
        synth.find_espeak("system")
    with pytest.raises(UserError, match="--espeak must be one of auto, bundled, system"):
        synth.find_espeak("debian")


@needs_bundled
def test_missing_espeak_data_is_an_error_not_an_exit(tmp_path):
    """Without espeakINITIALIZE_DONT_EXIT libespeak-ng ends the whole process when its data is missing."""
    code = (
        "from cpc_training import synth\n"
        "path, _, _ = synth.find_espeak('bundled')\n"
        "synth.find_espeak = lambda choice: (path, '/no/such/dir', 'test')\n"
        "try:\n    synth.Espeak()\nexcept synth.UserError as e:\n    print('UserError:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "UserError: espeak-ng (test) failed to initialise: its espeak-ng-data is missing\n"
