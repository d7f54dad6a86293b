"""Which engine a study runs on: ``study.engine=auto`` takes Ray where this machine's CPUs run two or more tasks at
once, and keeps the serial engine, saying why, where they do not; a study says each task as it ends."""

import json
import sys
from pathlib import Path

import pytest

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.fileio import cpu_cores
from aepretrain.label_study import chosen_engine

from .conftest import tiny
from .test_hostile import one_line_error
from .test_multinode import free_port


def auto(*overrides: str):
    """The tiny preset with auto's choice asked for, its fits on the CPU (auto keeps a GPU's fits serial)."""
    return resolve("tiny", overrides=["study.engine=auto", "trainer.device=cpu", *overrides])


def test_named_engines_are_taken_as_named() -> None:
    assert chosen_engine(resolve("tiny"), 10) == ("serial", "study.engine=serial")
    assert chosen_engine(resolve("tiny", overrides=["study.engine=ray"]), 1) == ("ray", "study.engine=ray")
    assert chosen_engine(auto("study.address=auto"), 1)[0] == "ray"


@pytest.mark.skipif(cpu_cores() < 2, reason="one core runs one task at a time")
def test_auto_runs_tasks_side_by_side_on_ray_where_the_cores_allow() -> None:
    pytest.importorskip("ray", reason="Ray is an extra: pip install -e '.[ray]'")
    engine, why = chosen_engine(auto(), 10)
    assert engine == "ray"
    assert why == (f"study.engine=auto; {min(cpu_cores(), 10)} tasks at a time, study.task_cpus=1 each, on this "
                   f"machine's {cpu_cores()} cores")
    assert chosen_engine(auto(), 2)[1].startswith("study.engine=auto; 2 tasks at a time")
    # a task has a thread at least: half a core each puts no more tasks side by side than one core each
    assert chosen_engine(auto("study.task_cpus=0.5"), 10)[1].startswith(f"study.engine=auto; {min(cpu_cores(), 10)} "
                                                                          "tasks at a time, study.task_cpus=0.5 each")


def test_auto_keeps_one_task_at_a_time_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def why_serial(cfg, tasks: int = 10) -> str:
        engine, why = chosen_engine(cfg, tasks)
        assert engine == "serial", why
        assert why.startswith("study.engine=auto; one task at a time on ")
        return why

    assert f"{cpu_cores()} core" in why_serial(auto(f"study.task_cpus={cpu_cores()}"))
    assert "hold one task of study.task_cpus=" in why_serial(auto(f"study.task_cpus={cpu_cores()}"))
    assert "as a fit runs in 2 processes" in why_serial(auto("trainer.device=cpu", "trainer.devices=2"))
    if cpu_cores() >= 2:
        assert "as one task is left" in why_serial(auto(), 1)
        monkeypatch.setitem(sys.modules, "ray", None)  # as where Ray is not installed: import ray fails
        assert "as Ray is not installed (pip install 'aepretrain[ray]'" in why_serial(auto())


def test_a_study_names_its_engine_and_each_task_as_it_ends(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    args = ["study", "--out", str(out), *(a for a in tiny() if a != "--quiet"), "--label-fractions", "1",
            "--seeds", "1", "--set", "study.epochs=1", "--set", "study.min_steps=2", "--set", "study.val_limit=null"]
    assert main(args) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[study]")]
    assert said[0] == "[study] engine serial: study.engine=serial"
    assert said[1].startswith("[study] 1 of 3 done: pre-training greedy seed 0, ")
    assert said[2].startswith("[study] 2 of 3 done: cell f1 scratch seed 0, test accuracy 0.")
    assert said[3].startswith("[study] 3 of 3 done: cell f1 greedy seed 0, test accuracy 0.")
    assert len(said) == 4
    assert main([*args, "--seeds", "2"]) == 0  # grows by a seed: counts on from the 3 done
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[study]")]
    assert said[0] == f"[study] resuming {out}: 3 of 6 pre-trainings and cells finished before (study.json), 3 left"
    assert [line.split(":")[0] for line in said[2:]] == [f"[study] {n} of 6 done" for n in (4, 5, 6)]
    assert main(args) == 0  # nothing left: no engine line, nothing done
    said = capsys.readouterr().err.splitlines()
    assert not [line for line in said if line.startswith("[study] engine") or " done: " in line], said


@pytest.mark.parametrize("address, said", [
    ("127.0.0.1:{port}", "nothing answers at study.address 127.0.0.1:{port} (Connection refused): start the cluster "
                         "there (ray start --head) or give the address it printed"),
    ("127.0.0.1:99999", "study.address 127.0.0.1:99999 is not auto or HOST:PORT"),
    ("cluster", "study.address cluster is not auto or HOST:PORT"),
    ("h:\u00b2", "study.address h:\u00b2 is not auto or HOST:PORT"),
    ("a" * 64 + ":6379", "nothing answers at study.address " + "a" * 64 + ":6379 (")])
def test_an_address_where_nothing_answers_is_one_line_before_anything_is_written(
        address: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Ray itself waits without end for a cluster at an address that does not answer (over 10 minutes, tried)."""
    port = free_port()
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *tiny(), "--engine", "auto", "--address",
                 address.format(port=port)]) == 2
    one_line_error(capsys, said.format(port=port))
    assert not out.exists()


GRID = ["--label-fractions", "1", "--seeds", "1", "--set", "study.epochs=1", "--set", "study.min_steps=2",
        "--set", "study.val_limit=null", "--device", "cpu"]


@pytest.mark.skipif(cpu_cores() < 2, reason="auto takes Ray only where two tasks fit side by side")
def test_where_ray_does_not_start_auto_runs_the_study_serially_and_ray_asked_for_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """RAY_ADDRESS=auto (Ray's own variable) with no cluster running: Ray refuses to start a new one."""
    pytest.importorskip("ray", reason="Ray is an extra: pip install -e '.[ray]'")
    if Path("/tmp/ray/ray_current_cluster").exists():  # RAY_ADDRESS=auto would join it
        pytest.skip("a Ray cluster runs on this machine")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), *tiny(), "--engine", "auto", *GRID]) == 0
    said = capsys.readouterr().err.splitlines()
    fallback = [line for line in said if line.startswith("aepretrain: Ray did not start (")]
    assert len(fallback) == 1 and fallback[0].endswith("): the serial engine runs the study"), said
    assert len(json.loads((out / "study.json").read_text())["cells"]) == 2
    assert main(["study", "--out", str(tmp_path / "asked"), *tiny(), "--engine", "ray", *GRID]) == 2
    one_line_error(capsys, "aepretrain: error: Ray did not start (", "); --engine serial runs the study without it")
