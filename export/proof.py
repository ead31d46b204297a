"""The proof: a written streaming graph, run as the daemon runs it, equals the offline PyTorch model.

    prove(Path("cpc.onnx"), model)      # prints one line per check; UserError above the tolerance

onnxruntime runs the graph (through the runtime's own loader and StreamBatch, rings bound in place) on
3 streams for many consecutive calls with the state threaded through, on random audio and on a real
utterance, and the model runs offline on each whole stream; z, c, the scores and log-probabilities must
agree within TOLERANCE (float32 weights) or TOLERANCE_INT8 (docs/onnx-contract.md, "The proof").

`model` is whatever training/checkpoint.py's load_model returns: our CPC, or a CPC_audio model. A model
with look-ahead returns its frames `delay` calls' worth of hops late (contract.ModelInfo.delay): the
streamed frames are compared with the offline frames of the same index, every offline frame but the
last `delay` (those read CPC_audio's padding after the end instead of audio: they are never streamed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from cpc_training.config import SAMPLE_RATE
from cpc_training.model import prediction_scores
from torch import nn

from cpc_stream.audio import load_audio
from cpc_stream.errors import UserError
from cpc_stream.onnx_model import OnnxModel, StreamBatch

# LibriSpeech test-clean 1089-134686-0000 (10.4 s, CC BY 4.0; the same file as in data/librispeech-mini),
# shipped inside the package so that an installed cpc-export can prove a graph from any folder.
DEFAULT_CHECK_AUDIO = Path(__file__).resolve().parent / "check-speech.flac"
# Max abs difference allowed between the graph run hop by hop and the model run offline. Measured
# differences are ~1e-6 (z, c) and ~1e-5 (scores, scaled by 1/temperature); see docs/onnx-contract.md.
TOLERANCE = {"z": 1e-4, "c": 1e-4, "scores": 1e-3, "logprob": 1e-3}
# The int8 variant's weights are 8-bit: its outputs are held to a looser, stated bound (onnx-contract.md).
TOLERANCE_INT8 = {"z": 0.1, "c": 0.05, "scores": 0.1, "logprob": 0.1}


def check_streams(
    model: nn.Module, audio_file: Path | None, calls: int, samples_per_call: int, seed: int = 0
) -> np.ndarray:
    """The audio the proof runs: 3 streams of `calls` calls each: white noise, a real utterance (looped
    to length), and the same utterance quieter and shifted. (3, calls * samples_per_call) float32."""
    n = calls * samples_per_call
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(n).astype(np.float32) * 0.1
    if audio_file is None:
        return np.stack([noise, rng.standard_normal(n).astype(np.float32), noise[::-1].copy()])
    speech = load_audio(audio_file, SAMPLE_RATE)
    speech = np.resize(speech, n + 4000)
    return np.stack([noise, speech[:n], 0.3 * speech[4000 : 4000 + n]]).astype(np.float32)


@torch.no_grad()
def compare(path: Path, model: nn.Module, audio: np.ndarray) -> dict[str, float]:
    """Run the graph hop by hop on each row of `audio` (whole calls) as the daemon does (StreamBatch:
    state bound once, rings updated in place) and the model offline on the whole rows; return the max
    abs difference of each output (NaN positions must agree). With look-ahead the streamed frames are
    the offline frames but the last `delay` (module docstring)."""
    runtime = OnnxModel(path, providers="cpu", threads=1)
    info = runtime.info
    n = info.samples_per_call
    streams = StreamBatch(runtime, audio.shape[0])
    got: dict[str, list[np.ndarray]] = {k: [] for k in info.outputs}
    for i in range(audio.shape[1] // n):
        out = streams.step(audio[:, i * n : (i + 1) * n])
        for k in info.outputs:
            got[k].append(out[k])
    stream = {k: np.concatenate(v, axis=1)[:, info.delay :] for k, v in got.items()}  # frames 0, 1, ...
    z, c = model(torch.from_numpy(audio))
    frames = stream["c"].shape[1]  # offline: `delay` more
    ref = {"z": z.numpy()[:, :frames], "c": c.numpy()[:, :frames]}
    if info.has_scores:
        scores, logprob, valid = prediction_scores(model, z, c, info.neg_window)
        ref.update(scores=scores.numpy()[:, :frames], logprob=logprob.numpy()[:, :frames])
        if not np.array_equal(
            stream["valid"], np.broadcast_to(valid.numpy()[:frames], stream["valid"].shape)
        ):
            raise AssertionError("valid mask differs from the offline model")
    diffs = {}
    for k, r in ref.items():
        s = stream[k]
        if s.shape != r.shape or not np.array_equal(np.isnan(s), np.isnan(r)):
            raise AssertionError(f"{k}: shape or NaN pattern differs from the offline model")
        diffs[k] = float(np.nanmax(np.abs(s - r))) if np.isfinite(r).any() else 0.0
    return diffs


def prove(path: Path, model: nn.Module, check_audio: Path = DEFAULT_CHECK_AUDIO, calls: int = 200) -> None:
    """Compare graph `path` with `model` on the random streams and on `check_audio`'s speech streams, each
    3 streams x `calls` calls; print one `cpc-export: check ...` line per set of streams. Raises UserError
    naming every output above its tolerance (TOLERANCE, or TOLERANCE_INT8 for an int8 graph)."""
    info = OnnxModel(path, providers="cpu", threads=1).info
    tolerance = TOLERANCE_INT8 if info.weights == "int8" else TOLERANCE
    failed = []
    for label, audio_file in (("random", None), ("speech", Path(check_audio))):
        audio = check_streams(model, audio_file, calls, info.samples_per_call)
        try:
            diffs = compare(path, model, audio)
        except AssertionError as e:
            raise UserError(f"streaming graph differs from the offline model: {label}: {e}") from None
        print(
            f"cpc-export: check {label}: 3 streams x {calls} calls: max |diff| "
            + " ".join(f"{k}={v:.2e}" for k, v in diffs.items())
        )
        failed += [f"{label} {k} {v:.2e} > {tolerance[k]:.0e}" for k, v in diffs.items() if v > tolerance[k]]
    if failed:
        raise UserError("streaming graph differs from the offline model: " + "; ".join(failed))
