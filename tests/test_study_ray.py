"""The study's grid on Ray (a local cluster of 2 CPUs) gives the serial engine's results, bit for bit in fp32 on the
CPU, when each task has as many threads as the serial run; a study on Ray killed with SIGKILL leaves no process
behind and resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aepretrain.cli import main
from aepretrain.fileio import cpu_cores

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


def started_by(mark: str) -> dict[int, str]:
    """The live processes whose environment carries ``mark`` (a driver's children inherit it, and Ray's processes
    theirs, whatever session or parent they end up in), by id, with their names; zombies are dead."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if mark.encode() in (proc / "environ").read_bytes().split(b"\0"):
                stat = (proc / "stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
        except (OSError, ValueError):  # not a process, gone, or another user's
            continue
    return found


def left_after(mark: str, seconds: float) -> dict[int, str]:
    """The processes of ``started_by(mark)`` still there after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while (found := started_by(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def recorded(out: Path) -> dict:
    """What study.json holds: (kind, key) -> the test accuracy of a cell, the epochs of a pre-training."""
    record = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
    return {**{("cell", (c["fraction"], c["arm"], c["seed"])): c["test_accuracy"] for c in record.get("cells", [])},
            **{("pretraining", (p["objective"], p["seed"])): p["epochs"] for p in record.get("pretraining", [])}}


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the driver's processes through /proc")
def test_a_killed_ray_study_leaves_no_process_and_resumes(tmp_path: Path) -> None:
    """SIGKILL to the driver's process group (a job scheduler's or a terminal's kill): no process of it is left (the
    driver, Ray's head, its workers), and the same command again, with study.engine=auto, takes over the lock, says
    it resumes and on which engine, keeps what was recorded (its checkpoints not written again), finishes the rest
    and says each task as it ends."""
    out = tmp_path / "study"
    command = [sys.executable, "-m", "aepretrain", "study", *(a for a in tiny() if a != "--quiet"), "--seeds", "2",
               "--label-fractions", "1", "--objectives", "greedy", "--set", "study.epochs=1", "--set",
               "study.min_steps=2", "--set", "study.val_limit=null", "--set", "study.task_cpus=1", "--device", "cpu",
               "--out", str(out), "--engine"]
    mark = f"AEPRETRAIN_TEST_RUN={tmp_path.name}-{os.getpid()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", **dict([mark.split("=")]))
    driver = subprocess.Popen([*command, "ray"], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not recorded(out) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, "the study ended before it could be killed"
        assert recorded(out), "no task finished within 120 s"
        running = started_by(mark).values()  # the search finds Ray's processes: the check below can fail
        assert any("raylet" in name for name in running) and any("ray::" in name for name in running), running
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = recorded(out)
    weights = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert left_after(mark, 10) == {}, "processes outlived the killed driver"
    assert (out / ".aepretrain-lock").read_text() == str(driver.pid)  # the killed driver could not clear it
    again = subprocess.run([*command, "auto"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stderr.splitlines()
    engine = "ray" if cpu_cores() >= 2 else "serial"  # auto: Ray where two tasks of 1 CPU fit side by side
    assert any(line.startswith(f"[study] engine {engine}: ") for line in said), again.stderr
    assert not [line for line in said if "Token authentication" in line]  # Ray's default, without its line
    assert [line.split(":")[0] for line in said if " done: " in line] == \
        [f"[study] {n} of 6 done" for n in range(len(before) + 1, 7)]
    assert f"aepretrain: took over the lock {out / '.aepretrain-lock'}, left by process {driver.pid}, which is gone" \
        in said, again.stderr
    assert (f"[study] resuming {out}: {len(before)} of 6 pre-trainings and cells finished before (study.json), "
            f"{6 - len(before)} left") in said, again.stderr
    record = json.loads((out / "study.json").read_text())
    cells = sorted((c["fraction"], c["arm"], c["seed"]) for c in record["cells"])
    assert cells == [(1.0, arm, seed) for arm in ("greedy", "scratch") for seed in (0, 1)]  # each exactly once
    assert sorted((p["objective"], p["seed"]) for p in record["pretraining"]) == [("greedy", 0), ("greedy", 1)]
    after = recorded(out)
    assert {key: after[key] for key in before} == before
    assert all(0 <= accuracy <= 1 for (kind, _), accuracy in after.items() if kind == "cell")
    kept = [p for p in weights if any(out / folder(*key) in p.parents for key in before)]
    assert kept and {p: p.stat().st_mtime_ns for p in kept} == {p: weights[p] for p in kept}
    assert left_after(mark, 10) == {}  # the rerun's Ray is gone too


def folder(kind: str, key: tuple) -> str:
    """Where a recorded task wrote its checkpoints in the study folder."""
    if kind == "pretraining":
        return f"pretrain/{key[0]}-seed{key[1]}"
    return f"cells/f{key[0]:g}-{key[1]}-seed{key[2]}"
