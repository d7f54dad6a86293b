"""benchmarks/gpu_check.sh: on a machine without a CUDA GPU it refuses at once, in one line, writing nothing.

Its GPU path (bench, smoke run, Oxford-sized timed run, evaluation on the GPU and the CPU) runs only on a
machine with one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU: the check would run")
def test_gpu_check_without_a_cuda_gpu_exits_3_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    result = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT), str(result)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"gpu_check: error: no CUDA GPU: torch.cuda.is_available() is false (python {sys.executable}, torch "
        f"{torch.__version__}); run this on a machine with one"]
    assert sorted(tmp_path.iterdir()) == []  # no result, no work folder
