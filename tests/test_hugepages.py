"""The runtime moves its memory (a new session's weights) into 2 MB pages where Linux allows it, and is
harmless where not: contents never change."""

import ctypes
import platform
import re
import sys
from pathlib import Path

import pytest

from cpc_stream.hugepages import collapse_anonymous_memory
from cpc_stream.onnx_model import OnnxModel

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def collapse_allowed() -> bool:
    """Linux >= 6.1 (MADV_COLLAPSE) with transparent huge pages not switched off."""
    if not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text():
        return False
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    return (major, minor) >= (6, 1)


def anon_huge_kb() -> int:
    rollup = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"AnonHugePages:\s+(\d+) kB", rollup).group(1))


def malloc_16mb() -> ctypes.Array:
    """16 MB from malloc, written (numpy would ask for huge pages itself; onnxruntime's weights don't)."""
    buf = ctypes.create_string_buffer(16 << 20)
    ctypes.memset(buf, 7, len(buf))
    return buf


def test_malloc_memory_is_collapsed_into_huge_pages_where_the_kernel_allows():
    hold = malloc_16mb()
    huge_before = anon_huge_kb() if collapse_allowed() else 0
    done = collapse_anonymous_memory()
    if collapse_allowed():
        assert done >= 8 << 20, done  # at least half of it, in whole 2 MB pages
        assert anon_huge_kb() - huge_before >= 8 << 10
    else:
        assert done == 0
    assert hold.raw[:4] == b"\x07" * 4 and hold.raw[-4:] == b"\x07" * 4  # contents unchanged


@pytest.fixture(scope="module")
def mid_onnx(tmp_path_factory):
    """A 256/128 model: 9 MB of float32 weights, enough to fill several 2 MB pages."""
    import torch
    from cpc_export.graph import export_onnx
    from cpc_training import config
    from cpc_training.model import CPC

    cfg = config.load(None, ["model.enc_dim=256", "model.ctx_dim=128"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mid") / "mid.onnx"
    export_onnx(CPC(cfg.model).eval(), cfg, 0, path, 1, 16)
    return path


def test_streaming_model_puts_its_weights_in_huge_pages_only_when_asked(mid_onnx):
    """A library class leaves the host process's memory alone by default; cpc-stream asks."""
    assert OnnxModel(mid_onnx, providers="cpu").huge_page_bytes == 0
    got = OnnxModel(mid_onnx, providers="cpu", huge_pages=True).huge_page_bytes
    if collapse_allowed():
        assert got >= 4 << 20, got
    else:
        assert got == 0
