"""A normal install works: the wheel, installed outside the source tree, runs its commands from any folder,
and an install without torch says in one line which extra a torch command needs.

Reinstalling torch into a fresh venv would take minutes, so each fresh venv gets the wheel alone
(`pip install --no-deps`) and sees its dependencies through a .pth file: the whole project .venv's
site-packages, or, for the runtime-only install, links to just the runtime's distributions (those the
wheel requires with the `cpu` extra, and theirs), torch not among them. A .pth line only adds a folder to
sys.path (the .venv's own .pth files, its editable install among them, are not run), and the venv's own
site-packages comes first: cpc_stream, cpc_training and cpc_export are the wheel's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO, UTT_4051
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (a build/ folder left in the checkout could add stale files)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("cpc_stream", "training", "export"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "-w", str(out), str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("cpc_stream-*.whl")
    return whl


def venv_with(tmp: Path, wheel: Path, deps: Path) -> Path:
    """A fresh venv in `tmp` holding only `wheel`, that sees folder `deps` through a .pth file; its bin/."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True, timeout=120)
    python = tmp / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    (Path(site) / "project_deps.pth").write_text(f"{deps}\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, timeout=300)
    return tmp / "bin"


def runtime_closure() -> set[str]:
    """Distributions the runtime needs: cpc-stream's requirements without an extra, plus the `cpu` extra,
    and all of theirs (environment markers evaluated here)."""
    own = [Requirement(r) for r in metadata.requires("cpc-stream")]
    todo = [r.name for r in own if not r.marker or r.marker.evaluate({"extra": "cpu"})]
    seen: set[str] = set()
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name not in seen:
            seen.add(name)
            deps = [Requirement(r) for r in metadata.requires(name) or []]
            todo += [r.name for r in deps if not r.marker or r.marker.evaluate({"extra": ""})]
    return seen


def link_distributions(names: set[str], folder: Path) -> None:
    """Symlink every top-level file and folder of the installed distributions `names` into `folder`."""
    folder.mkdir()
    for name in names:
        for entry in {f.parts[0] for f in metadata.distribution(name).files or []}:
            src = Path(sysconfig.get_paths()["purelib"]) / entry
            if entry in ("..", "__pycache__") or entry.endswith(".pth") or not src.exists():
                continue
            if not (folder / entry).exists():
                (folder / entry).symlink_to(src)


def run(bin_dir: Path, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_the_wheel_runs_its_commands_from_any_folder(tmp_path, wheel, tiny_checkpoint):
    """cpc-export proves a graph with the check audio shipped inside the package (the default
    --check-audio), cpc-features and cpc-stream run, all from a folder outside the source tree."""
    bin_dir = venv_with(tmp_path / "venv", wheel, Path(sysconfig.get_paths()["purelib"]))
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run(
        bin_dir, "python", "-c", "import cpc_export, cpc_stream; print(cpc_export.__file__)", cwd=work
    )
    assert where.stdout.startswith(str(tmp_path / "venv")), where.stdout + where.stderr
    out = run(bin_dir, "cpc-export", "--checkpoint", str(tiny_checkpoint), "--out", "m.onnx", "--check-calls", "20",
              cwd=work)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "cpc-export: check speech: 3 streams x 20 calls" in out.stdout and (work / "m.onnx").is_file()
    feats = run(
        bin_dir, "cpc-features", "--checkpoint", str(tiny_checkpoint), "--out", "f", str(UTT_4051), cwd=work
    )
    assert feats.returncode == 0, feats.stderr
    assert (work / "f" / "4051-11218-0044.npz").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["f", "m.onnx"]  # no temporaries left behind
    stream = run(bin_dir, "cpc-stream", "--help", cwd=work)
    assert stream.returncode == 0 and "--model" in stream.stdout, stream.stderr


def test_without_torch_the_torch_commands_name_the_extra_in_one_line(tmp_path, wheel):
    runtime = tmp_path / "runtime-site"
    link_distributions(runtime_closure(), runtime)
    bin_dir = venv_with(tmp_path / "venv", wheel, runtime)
    probe = run(bin_dir, "python", "-c", "import numpy, onnxruntime, soundfile, soxr, yaml, zmq; import torch",
                cwd=tmp_path)  # fmt: skip
    assert "No module named 'torch'" in probe.stderr, probe.stderr  # the runtime is all there, torch is not
    for prog in ("cpc-train", "cpc-export", "cpc-features", "cpc-eval", "cpc-synth"):
        r = run(bin_dir, prog, "--help", cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (prog, r.stderr)
        assert r.stderr.splitlines() == [
            f"{prog}: error: needs the 'train' extra (torch): pip install 'cpc-stream[train]'"
        ], r.stderr
    stream = run(bin_dir, "cpc-stream", "--help", cwd=tmp_path)
    assert stream.returncode == 0 and "--model" in stream.stdout, stream.stderr
