"""The study's grid on Ray (a local cluster of 2 CPUs) gives the serial engine's results, bit for bit in fp32 on the
CPU, when each task has as many threads as the serial run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aepretrain.cli import main

from .conftest import tiny

pytest.importorskip("ray", reason="Ray is an extra: pip install -e '.[ray]'")

VARIES = ("seconds", "val_seconds", "val_share", "pretrain_seconds")


def results(out: Path) -> dict:
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VARIES}
        return [strip(v) for v in x] if isinstance(x, list) else x
    record = json.loads((out / "study.json").read_text())
    return {"cells": sorted(strip(record["cells"]), key=lambda c: (c["fraction"], c["arm"], c["seed"])),
            "pretraining": sorted(strip(record["pretraining"]), key=lambda p: (p["objective"], p["seed"])),
            "summary": strip(record["summary"])}


def test_the_grid_on_ray_equals_the_serial_engine(tmp_path: Path) -> None:
    """The serial run is a process of its own with one thread, as each Ray task of 1 CPU is: oneDNN chooses its
    kernels by the threads a process starts with, and a kernel's sums in another order differ in the last bits."""
    grid = ["study", *tiny(), "--label-fractions", "1", "--seeds", "2", "--objectives", "greedy",
            "--set", "study.epochs=1", "--set", "study.min_steps=2", "--set", "study.val_limit=null"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    serial = subprocess.run([sys.executable, "-m", "aepretrain", *grid, "--out", str(tmp_path / "serial")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert serial.returncode == 0, serial.stderr[-3000:]
    assert main([*grid, "--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    on_ray = results(tmp_path / "ray")
    assert len(on_ray["cells"]) == 2 * 2 and len(on_ray["pretraining"]) == 2
    assert on_ray == results(tmp_path / "serial")
    assert (tmp_path / "ray" / "study.md").is_file()
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*.safetensors")}
    assert main([*grid, "--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0  # all done: nothing runs again
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*.safetensors")} == finished
    assert results(tmp_path / "ray") == on_ray
