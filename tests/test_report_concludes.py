"""A newcomer's first hour (issue 21, items 2 and 3): a report that says what the run shows and keeps the lab
report's numbers apart unless the run did the lab's task; a failed start that leaves nothing in the way."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain import runfolder
from aepretrain.runfolder import MARKER, run_folder, save_settings, saved_settings

from .conftest import tiny
from .test_hostile import one_line_error

MISSING = ["--dataset", "folder", "--root", "/nonexistent/aepretrain-data"]


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A run whose first start (by a version that wrote config.yaml before it checked the data) failed at the
    data, finished by the corrected command without --resume, in a process of its own: the folder, and what
    the user saw on stdout and stderr."""
    out = tmp_path_factory.mktemp("restart") / "run"
    with run_folder(out, "run"):
        save_settings(resolve("tiny", **{"data.dataset": "folder", "data.root": MISSING[-1]}), out)
    result = subprocess.run([sys.executable, "-m", "aepretrain", "run", "--out", str(out), *tiny()],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result.stdout, result.stderr


# 3. a failed start leaves nothing in the way


def test_a_wrong_data_root_leaves_no_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *tiny(), *MISSING]) == 2
    one_line_error(capsys, "data root not found: /nonexistent/aepretrain-data")
    assert not out.exists()


def test_the_corrected_command_replaces_an_unfinished_start_and_says_so(restarted: tuple[Path, str, str]) -> None:
    out, _, stderr = restarted
    assert stderr.splitlines() == [f"aepretrain: {out} held only a start that never finished a stage (settings, no "
                                   "results): this run replaces it"]
    assert saved_settings(out).data.dataset == "synthetic" and (out / "report.md").is_file()


def test_overwrite_with_a_wrong_root_keeps_the_finished_run(restarted: tuple[Path, str, str], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "run"
    shutil.copytree(restarted[0], copy)
    metrics = (copy / "metrics.json").read_text()
    assert main(["run", "--out", str(copy), "--overwrite", *tiny(), *MISSING]) == 2
    one_line_error(capsys, "data root not found")
    assert (copy / "metrics.json").read_text() == metrics and saved_settings(copy).data.dataset == "synthetic"


def test_a_folder_with_a_finished_stage_or_epoch_still_refuses(restarted: tuple[Path, str, str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    start = tmp_path / "start"
    start.mkdir()
    for name in (MARKER, "config.yaml", "data.json", "figures/samples.png"):
        (start / name).parent.mkdir(exist_ok=True)
        shutil.copy(restarted[0] / name, start / name)
    (start / "notes.txt").write_text("mine")  # a user's file changes nothing
    assert runfolder.unfinished_start(start)
    for done in ("checkpoints/pretrain-stage1.json", "checkpoints/resume/stage1/last.ckpt", "metrics.json",
                 "figures/reconstructions.png", "logs/stage1/metrics.csv"):
        folder = tmp_path / done.replace("/", "-")
        shutil.copytree(start, folder)
        (folder / done).parent.mkdir(parents=True, exist_ok=True)
        (folder / done).write_text("{}")
        assert not runfolder.unfinished_start(folder), done
    stage = tmp_path / "checkpoints-pretrain-stage1.json"
    assert main(["run", "--out", str(stage), *tiny("data.image_size=24")]) == 2
    one_line_error(capsys, "already holds a run: pass --resume to continue it or --overwrite to replace it")


# 2. a report that concludes


def test_the_report_first_says_what_the_run_shows(restarted: tuple[Path, str, str]) -> None:
    out = restarted[0]
    m = json.loads((out / "metrics.json").read_text())
    pre, scratch = m["finetune"]["pretrained"], m["finetune"]["scratch"]
    md = (out / "report.md").read_text()
    assert md.index("## What this run shows") < md.index("## Settings") < md.index("## 1. Data")
    first = md.split("## What this run shows\n\n")[1].split("\n")[0]
    gap = (pre["test_accuracy"] - scratch["test_accuracy"]) * 100
    target = f"95 % of the scratch arm's best validation accuracy ({m['target_accuracy'] * 100:.2f} %)"
    for said in (f"pretrained **{pre['test_accuracy'] * 100:.2f} %**, scratch **{scratch['test_accuracy'] * 100:.2f} %**",
                 f"a gap of {gap:+.2f} points", f"Epochs to the target, {target}: pretrained ",
                 "A linear probe of the frozen features does best at depth ", "of the random one",
                 "One seed gives no verdict: `aepretrain study` measures the gain over seeds with a 95 % interval",
                 "its numbers are in the last section, for orientation"):
        assert said in first, said
    assert "<code>aepretrain study</code> measures the gain" in (out / "report.html").read_text()
    stdout = restarted[1].splitlines()
    assert stdout[-3].startswith(f"pretrained: test accuracy {pre['test_accuracy'] * 100:.2f} %, reached {target} "
                                 "in ") and stdout[-3].endswith(("1 epoch", "2 epochs"))
    assert stdout[-1] == "one seed gives no verdict: `aepretrain study` measures the gain over seeds with a 95 % interval"


def test_the_lab_report_stands_apart_from_another_task(restarted: tuple[Path, str, str]) -> None:
    md = (restarted[0] / "report.md").read_text()
    ours, lab = md.split("## The lab report (for orientation, not comparable)\n")
    assert "lab report" not in "".join(re.findall(r"^\|.*\|$", ours, re.M))  # our tables hold our numbers only
    assert "Bombay" not in ours and "1,128,997" not in ours and "Bombay 0.999999" in lab
    assert "Oxford-IIIT Pet (37 cat and dog breeds, 224x224 RGB)" in lab and "| scratch | 1.0759 | 66.78 % | 66 |" in lab
    assert "early stopping off" in ours and "None" not in md  # patience null is a setting: off
    times = re.findall(r"^\| #\d \| [\d,/ ]+ \| \d+ \| ([^|]+) \|", ours, re.M)  # stage times for people
    assert len(times) == 3 and all(re.fullmatch(r"\d+\.\d s|\d+ min( \d+ s)?", t.strip()) for t in times), times


def test_the_lab_numbers_stand_beside_ours_on_the_lab_s_task(restarted: tuple[Path, str, str], tmp_path: Path) -> None:
    """The report decides from the run's own record: the same folder, recorded as the seed network on Oxford-IIIT
    Pet's 37 breeds at 224 px, gets the lab's columns and no section apart."""
    out = tmp_path / "run"
    shutil.copytree(restarted[0], out)
    save_settings(resolve("seed"), out)
    m = json.loads((out / "metrics.json").read_text())
    breeds = [f"breed{k}" for k in range(37)]
    m["dataset"] |= {"name": "oxford-pets", "classes": breeds, "image_size": 224}
    for arm in m["finetune"].values():
        arm["per_class_accuracy"] = dict.fromkeys(breeds, 0.5)
    (out / "metrics.json").write_text(json.dumps(m))
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "The lab report (for orientation" not in md and "This run did the lab report's task" in md
    assert "| encoder.blocks.0.conv1 | Conv2d | (112, 112, 64) | 9,472 | 9,472 |" in md
    assert "| total |  |  | 1,128,997 | 1,128,997 |" in md
    assert re.search(r"^\| scratch \|.* \| 1\.0759 \| 66\.78 % \| 66 \|$", md, re.M)
    assert "| lab report: a Bombay cat | Bombay | Bombay 0.999999 |" in md


def test_resume_without_settings_of_a_start_that_saved_none_is_one_line(tmp_path, capsys) -> None:
    from aepretrain.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / ".aepretrain-run.json").write_text('{"aepretrain": "0.1.0", "kind": "run"}')  # killed before its settings
    assert main(["run", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"aepretrain: error: --resume: {out} holds no saved settings (a run there never "
                                    "got past its start): give the run's settings again (--preset, --config, --set, ...)")
