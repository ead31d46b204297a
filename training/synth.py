"""cpc-synth: a synthetic multi-speaker corpus in LibriSpeech layout with frame-level phone labels.

    cpc-synth --out data/synth --speakers 12 --utterances 60

espeak-ng voices (accent x voice variant) are the speakers; random English sentences are the text. The
phone timings come from espeak-ng's own phoneme events (its C library, through ctypes), so every 10 ms
frame gets a real label. Each utterance gets its own rate and pitch jitter and a little noise, so the
corpus is less steady than raw synthesis. Written:

    <out>/train-clean-100/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac   16 kHz mono
    <out>/converted_aligned_phones.txt   CPC format: utt-id, then one label per 10 ms (25 ms windows)
    <out>/train_split.txt, test_split.txt   every speaker in both, 80 / 20 utterances
    <out>/phones.txt                       label -> espeak-ng phoneme (0 = silence)
    <out>/espeak-ng.txt                    which libespeak-ng made it (version, bundled or system)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib.metadata
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from cpc_stream.errors import UserError, run_cli

from .config import SAMPLE_RATE
from .data import phone_label_count

ACCENTS = (
    "gmw/en-US",
    "gmw/en",
    "gmw/en-GB-scotland",
    "gmw/en-GB-x-rp",
    "gmw/en-029",
    "gmw/en-GB-x-gbclan",
    "gmw/en-GB-x-gbcwmd",
)  # voice files
VARIANTS = ("m1", "f1", "m3", "f3", "m5", "f2")
WORDS = """the of and to in is was he for it with as his on be at by had are but from or have an they which
one you were her all she there would their we him been has when who will more no if out so said what up
its about into than them can only other new some could time these two may then do first any my now
such like our over man me even most made after also did many before must through back years where much
your way well down should because each just those people how too little state good very make world
still own see men work long get here between both life being under never day same another know while
last might us great old year off come since against go came right used take three states himself few
house use during without again place around however home small found thought went say part once high
general upon school every don't does got united left number course war until always away something fact
water though less public put think almost hand enough far took head yet government system better set
told nothing night end why called didn't eyes find going look asked later knew point next city program
business give group toward young days let room president side social given present several order
national possible rather second face per among form important often things looked early white case
john become large big need four within felt along children saw best church ever least power development
light thing family seemed interest want members mind country area others done turned although open god
service certain kind problem began different door thus help sense means whole matter perhaps itself
york it's times law human line above name example action company hands local show five history whether
gave either today act feet across taken past quite anything seen having death week experience body word
half really field am car words already themselves information tell together college shall money period
held keep sure real probably free seems political cannot behind miss question air office making brought
whose special major heard problems federal became study ago moment available known result street economic
boy position reason change south board individual job areas society west close turn love community true
court force full seem wife future age wanted department voice center woman control common necessary
following front sometimes six girl clear further land run students provide feel party able mother music
education university child effect level stood military town short morning total outside rate figure
class art century washington north usually leave therapy evening minutes bring river garden stone""".split()

# espeak_EVENT from speak_lib.h
PHONEME_EVENT = 7


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
        ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p), ("id", _EventId),
    ]  # fmt: skip


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)


ESPEAK_CHOICES = ("auto", "bundled", "system")
# espeak-ng's stress marks (primary, secondary, unstressed, stress on the preceding syllable). Since 1.52 its
# phoneme events carry them ("'a", ",I"); 1.51 (Debian 12) does not. Stress is not phone identity: dropped,
# so both libraries give the same phone classes.
STRESS_MARKS = "',%="
# Both libraries are libespeak-ng.so.1: once one is loaded, loading the other by that name gives the first
# again, so a process uses one of them (the first Espeak's).
_loaded: list[str] = []


def find_espeak(choice: str = "auto") -> tuple[str, str | None, str]:
    """Which libespeak-ng to load: (library, data directory or None for the library's own, description).

    bundled: the library and data of the espeakng-loader wheel (the `eval` extra), the same on every machine
    that installs that version. system: the operating system's (Debian/Ubuntu: libespeak-ng1). auto: bundled
    when its wheel is installed (it is for Linux x86-64, macOS arm64, Windows), else system."""
    if choice not in ESPEAK_CHOICES:
        raise UserError(f"--espeak must be one of {', '.join(ESPEAK_CHOICES)}, not {choice!r}")
    if choice in ("auto", "bundled"):
        try:
            import espeakng_loader
        except ImportError:
            if choice == "bundled":
                raise UserError("no bundled libespeak-ng: pip install espeakng-loader") from None
        else:
            lib = Path(espeakng_loader.get_library_path())
            if lib.exists():
                version = importlib.metadata.version("espeakng-loader")
                # espeak_Initialize takes the folder that holds espeak-ng-data
                return str(lib), str(lib.parent), f"espeakng-loader {version}"
            if choice == "bundled":
                raise UserError(f"espeakng-loader is installed without its library {lib}")
    name = ctypes.util.find_library("espeak-ng")
    if name is None and choice == "system":
        raise UserError("no system libespeak-ng: apt-get install libespeak-ng1")
    if name is None:
        raise UserError(
            "libespeak-ng not found: pip install espeakng-loader (Linux x86-64, macOS arm64, Windows) "
            "or apt-get install libespeak-ng1"
        )
    return name, None, f"system {name}"


class Espeak:
    """espeak-ng's C library in synchronous mode: text -> (samples int16 at self.rate, [(ms, phoneme)]).

    `library` (find_espeak's choice) says which libespeak-ng; self.source and self.version say which it is."""

    def __init__(self, library: str = "auto") -> None:
        path, data, self.source = find_espeak(library)
        if _loaded and _loaded[0] != path:
            raise UserError(f"this process has loaded libespeak-ng {_loaded[0]}: it cannot load {path} too")
        try:
            self.lib = ctypes.CDLL(path)
        except OSError as e:
            raise UserError(f"cannot load libespeak-ng ({self.source}): {e}") from None
        _loaded[:] = [path]
        self.lib.espeak_Initialize.restype = ctypes.c_int
        # AUDIO_OUTPUT_SYNCHRONOUS = 2; espeakINITIALIZE_PHONEME_EVENTS = 1, espeakINITIALIZE_DONT_EXIT = 0x8000
        # (without it a missing espeak-ng-data ends the whole process)
        self.rate = self.lib.espeak_Initialize(2, 0, data.encode() if data else None, 0x8001)
        if self.rate <= 0:
            raise UserError(f"espeak-ng ({self.source}) failed to initialise: its espeak-ng-data is missing")
        self.lib.espeak_Info.restype = ctypes.c_char_p
        self.version = self.lib.espeak_Info(None).decode()
        self._cb = _CALLBACK(self._collect)  # keep a reference: the library calls it
        self.lib.espeak_SetSynthCallback(self._cb)
        self._audio: list[np.ndarray] = []
        self._events: list[tuple[int, str]] = []

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._audio.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != 0:  # espeakEVENT_LIST_TERMINATED
            if events[i].type == PHONEME_EVENT:
                name = events[i].id.string.decode("ascii", "replace")
                name = name.lstrip(STRESS_MARKS) or name
                self._events.append((events[i].audio_position, name))
            i += 1
        return 0

    def voice(self, name: str, rate: int, pitch: int) -> None:
        if self.lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise UserError(f"espeak-ng has no voice {name!r}")
        self.lib.espeak_SetParameter(1, rate, 0)  # espeakRATE, words per minute
        self.lib.espeak_SetParameter(3, pitch, 0)  # espeakPITCH, 0..100

    def say(self, text: str) -> tuple[np.ndarray, list[tuple[int, str]]]:
        self._audio, self._events = [], []
        data = text.encode() + b"\0"
        self.lib.espeak_Synth(data, len(data), 0, 1, 0, 0, None, None)  # POS_CHARACTER, espeakCHARS_AUTO
        self.lib.espeak_Synchronize()
        wav = np.concatenate(self._audio) if self._audio else np.zeros(0, np.int16)
        return wav, list(self._events)


def frame_labels(samples: int, events: list[tuple[int, str]], vocab: dict[str, int]) -> np.ndarray:
    """One label per 25 ms window with a 10 ms hop (the CPC alignment format): the phoneme sounding at
    the window's centre. Pauses ("_" phonemes) and time outside the phonemes are silence (0)."""
    n = phone_label_count(samples)
    centres_ms = (np.arange(n) * 160 + 200) / SAMPLE_RATE * 1000
    times = np.array([t for t, _ in events] + [samples / SAMPLE_RATE * 1000])
    labels = np.zeros(n, dtype=np.int64)
    for i, (_t, ph) in enumerate(events):
        if ph.startswith("_"):
            continue
        inside = (centres_ms >= times[i]) & (centres_ms < times[i + 1])
        labels[inside] = vocab.setdefault(ph, len(vocab) + 1)
    return labels


def generate(out: Path, speakers: int, utterances: int, seed: int = 0, espeak: str = "auto") -> dict:
    rng = np.random.default_rng(seed)
    tts = Espeak(espeak)
    voices = [f"{a}+{v}" for v in VARIANTS for a in ACCENTS][:speakers]
    if len(voices) < speakers:
        raise UserError(f"at most {len(ACCENTS) * len(VARIANTS)} synthetic speakers")
    vocab: dict[str, int] = {}
    lines, train_ids, test_ids, total_s = [], [], [], 0.0
    for s, voice in enumerate(voices):
        spk, chapter = str(100 + s), str(1000 + s)
        folder = out / "train-clean-100" / spk / chapter
        folder.mkdir(parents=True, exist_ok=True)
        base_pitch, base_rate = int(rng.integers(30, 70)), int(rng.integers(150, 190))
        for u in range(utterances):
            tts.voice(voice, base_rate + int(rng.integers(-20, 21)), base_pitch + int(rng.integers(-10, 11)))
            text = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 16))))
            wav, events = tts.say(text)
            x = soxr.resample(wav.astype(np.float32) / 32768, tts.rate, SAMPLE_RATE)
            x = (x * rng.uniform(0.3, 1.0) + rng.normal(0, rng.uniform(0.0003, 0.003), len(x))).astype(
                np.float32
            )
            x = np.clip(x, -1, 1)
            uid = f"{spk}-{chapter}-{u:04d}"
            sf.write(folder / f"{uid}.flac", x, SAMPLE_RATE, subtype="PCM_16")
            labels = frame_labels(len(x), events, vocab)
            lines.append(uid + " " + " ".join(map(str, labels)))
            (test_ids if u % 5 == 4 else train_ids).append(uid)
            total_s += len(x) / SAMPLE_RATE
    (out / "converted_aligned_phones.txt").write_text("\n".join(lines) + "\n")
    (out / "train_split.txt").write_text("\n".join(train_ids) + "\n")
    (out / "test_split.txt").write_text("\n".join(test_ids) + "\n")
    (out / "phones.txt").write_text(
        "0 SIL\n" + "".join(f"{i} {p}\n" for p, i in sorted(vocab.items(), key=lambda kv: kv[1]))
    )
    espeak_used = f"espeak-ng {tts.version} ({tts.source})"
    (out / "espeak-ng.txt").write_text(espeak_used + "\n")
    return {
        "speakers": speakers,
        "utterances": speakers * utterances,
        "hours": total_s / 3600,
        "phones": len(vocab) + 1,
        "espeak": espeak_used,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpc-synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--speakers", type=int, default=12)
    ap.add_argument("--utterances", type=int, default=60, help="per speaker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--espeak",
        choices=ESPEAK_CHOICES,
        default="auto",
        help="which libespeak-ng: the espeakng-loader wheel's (bundled), the system's, or bundled if installed "
        "(auto). The two differ slightly in timing and audio: see README, Dependencies",
    )
    args = ap.parse_args(argv)

    def body() -> int:
        if args.speakers < 1 or args.utterances < 5:
            raise UserError("--speakers must be >= 1 and --utterances >= 5 (one in five is held out)")
        s = generate(Path(args.out), args.speakers, args.utterances, args.seed, args.espeak)
        print(f"cpc-synth: {s['utterances']} utterances of {s['speakers']} speakers, {s['hours']:.2f} h, "
              f"{s['phones']} phone classes, {s['espeak']} -> {args.out}")  # fmt: skip
        return 0

    return run_cli("cpc-synth", body)


if __name__ == "__main__":
    sys.exit(main())
