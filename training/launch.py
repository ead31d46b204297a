"""The console commands that need torch, started without importing torch first.

On a runtime-only install (`pip install 'cpc-stream[cpu]'`: the daemon, no torch) cpc-train, cpc-export,
cpc-features, cpc-eval and cpc-synth say in one line which extra to install, instead of an import
traceback. Each function below is a [project.scripts] entry point (pyproject.toml); it imports its
command's module only when run. This module imports nothing that an install without extras lacks.
"""

from __future__ import annotations

import importlib
import sys

# Top-level modules of the optional extras (pyproject.toml) and the extra that installs each.
EXTRA_OF = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "tqdm": "train",
    "librosa": "eval",
    "sklearn": "eval",
    "matplotlib": "eval",
}


def launch(prog: str, module: str) -> int:
    """Import `module` and run its main(); a missing module of an extra is one line and exit 2."""
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in EXTRA_OF:
            raise
        extra = EXTRA_OF[missing]
        print(
            f"{prog}: error: needs the '{extra}' extra ({missing}): pip install 'cpc-stream[{extra}]'",
            file=sys.stderr,
        )
        return 2
    return main()


def cpc_train() -> int:
    return launch("cpc-train", "cpc_training.train")


def cpc_features() -> int:
    return launch("cpc-features", "cpc_training.features")


def cpc_eval() -> int:
    return launch("cpc-eval", "cpc_training.eval")


def cpc_synth() -> int:
    return launch("cpc-synth", "cpc_training.synth")


def cpc_export() -> int:
    return launch("cpc-export", "cpc_export.cli")
