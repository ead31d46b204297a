"""The example downstream classifier: a linear probe applied live to c_t from the daemon."""

import json
import subprocess
import sys

import numpy as np
from conftest import REPO, UTT_2911, UTT_4051, free_port, start_daemon
from cpc_training.features import extract
from cpc_training.probe import fit_linear_probe, save_probe

from cpc_stream.audio import load_audio
from cpc_stream.probe import LinearProbe, Smoother


def test_live_classifier_decides_per_frame_as_the_offline_probe(small_onnx, tmp_path):
    path, model = small_onnx
    feats = {u: extract(model, load_audio(u, 16000), 16)["c"] for u in (UTT_2911, UTT_4051)}
    x = np.concatenate(list(feats.values()))
    y = np.concatenate([np.full(len(f), i) for i, f in enumerate(feats.values())])
    probe_path = tmp_path / "probe.npz"
    save_probe(probe_path, fit_linear_probe(x, y, 2), ["2911", "4051"])

    port = free_port()
    jsonl = tmp_path / "decisions.jsonl"
    clf = subprocess.Popen([sys.executable, str(REPO / "examples/live_classifier.py"), "--probe", str(probe_path),
                            "--connect", f"tcp://127.0.0.1:{port}", "--jsonl", str(jsonl), "--until-eos"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    daemon, _ = start_daemon(path, "--file", str(UTT_2911), "--wait-subscribers", "1", port=port)
    assert daemon.wait(timeout=60) == 0
    out, err = clf.communicate(timeout=60)
    assert clf.returncode == 0, err
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    probe = LinearProbe.load(probe_path)
    lp = probe.log_probs(feats[UTT_2911])
    assert [r["frame"] for r in rows] == list(range(len(lp)))
    assert [r["raw"] for r in rows] == [probe.classes[i] for i in lp.argmax(1)]
    smoothed = Smoother(2, 0.5).update(lp)
    assert [r["smoothed"] for r in rows] == [probe.classes[i] for i in smoothed]
    assert out.startswith("2911-12359-0007    0.00 s: ")
