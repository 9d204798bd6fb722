"""Every benchmark script imports as documented (``python benchmarks/<name>.py`` puts benchmarks/ first on
sys.path): none is named like a package that it or its dependencies import (a ``benchmarks/kernels.py`` once
shadowed the ``kernels`` package that transformers imports, and the quality benchmarks stopped)."""

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_every_benchmark_imports_with_its_directory_first_on_the_path():
    names = sorted(p.stem for p in BENCH.glob("*.py"))
    assert "quality" in names and "step_time" in names
    # one process, as `python benchmarks/x.py` runs: the directory first, then what the scripts import
    code = (f"import sys, importlib; sys.path.insert(0, {str(BENCH)!r}); "
            "import transformers; from transformers import LlamaForCausalLM; "
            f"[importlib.import_module(n) for n in {names!r}]")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(BENCH), capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(BENCH.parent), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
