"""What aepretrain says and writes about the user's names (issue 19, items 12, 16), and the CPU's bf16 detection
forced either way (item 17): class and file names with `|`, HTML and newlines; a folder passed as an image."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aepretrain.cli import main
from aepretrain.config import TrainerConfig
from aepretrain.training import resolved_precision, trainer

from .conftest import photo, tiny
from .test_hostile import one_line_error

# class folder names a user may have: a table's cell separator, markup, a newline
ODD_CLASSES = ("a|b", "<img src=x onerror=alert(1)>", "new\nline", "plain")


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("odd") / "data"
    for c, name in enumerate(ODD_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(10):
            photo(c * 100 + i, size=(20, 20)).save(root / name / f"{i}.png")
    (root / "plain" / "bad|<b>.png").write_bytes(b"not an image")  # listed in the report's skipped files
    out = root.parent / "run"
    assert main(["run", "--out", str(out), *tiny("finetune.epochs=1", "probe.enabled=false"),
                 "--dataset", "folder", "--root", str(root)]) == 0
    return out


def cells(line: str) -> list[str]:
    """A Markdown table row's cells: split at each `|` that no backslash escapes."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def test_report_escapes_class_and_file_names_in_markdown_and_html(odd_run: Path) -> None:
    md = (odd_run / "report.md").read_text()
    tables = re.findall(r"(?:^\|.*\n)+", md, re.M)
    assert len(tables) >= 8
    for table in tables:
        rows = table.splitlines()
        assert rows[1] == "|" + "---|" * len(cells(rows[0])), rows[0]
        for row in rows[2:]:
            assert len(cells(row)) == len(cells(rows[0])), row
    assert "<" not in md  # no raw tag of the user's (figures are Markdown images)
    per_class = md[md.index("| class | pretrained accuracy"):]
    for shown in (r"a\|b", "&lt;img src=x onerror=alert(1)&gt;", r"new\\nline", "plain"):
        assert f"\n| {shown} | " in per_class, shown
    assert r"/plain/bad\|&lt;b&gt;.png | " in md  # the skipped file's path
    page = (odd_run / "report.html").read_text()
    assert "<img src=x" not in page and "<b>.png" not in page
    assert "<td>&lt;img src=x onerror=alert(1)&gt;</td>" in page and r"<td>new\nline</td>" in page


def test_predict_shows_names_with_a_newline_escaped_on_one_line(odd_run: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "tabby\ncat.png"
    photo(7, size=(20, 20)).save(image)
    checkpoint = odd_run / "checkpoints" / "classifier-pretrained.safetensors"
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--top-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path}/tabby\\ncat.png" and len(lines) == 5
    ranked = sorted(re.match(r"  [1-4]\. (.*?) +[0-9.e-]+$", line).group(1) for line in lines[1:])
    assert ranked == sorted(["a|b", "<img src=x onerror=alert(1)>", r"new\nline", "plain"])
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image"] == str(image)  # JSON keeps the name exact


def test_predict_of_a_folder_says_it_is_a_folder(odd_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = odd_run / "checkpoints" / "classifier-pretrained.safetensors"
    photo(3).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), str(tmp_path), "--checkpoint", str(checkpoint)]) == 2
    one_line_error(capsys, f"aepretrain: error: {tmp_path} is a folder, not an image: pass its image files "
                           f"(e.g. {tmp_path}/*.jpg)\n")


@pytest.mark.parametrize("forced, auto, lightning", [("0", "32", "32-true"), ("1", "bf16-mixed", "bf16-mixed")])
def test_cpu_bf16_forced_either_way_decides_auto_precision(forced: str, auto: str, lightning: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEPRETRAIN_CPU_BF16", forced)
    assert resolved_precision("auto", "cpu") == auto
    assert resolved_precision("32", "cpu") == "32" and resolved_precision("bf16-mixed", "cpu") == "bf16-mixed"
    fit = trainer(TrainerConfig(device="cpu", progress=False), tmp_path, "stage1", 1, [])
    assert fit.precision == lightning  # the Trainer that every stage and arm fits with


def test_a_wrong_cpu_bf16_value_is_one_line_before_anything_is_written(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AEPRETRAIN_CPU_BF16", "yes")
    assert main(["run", "--out", str(tmp_path / "run"), *tiny()]) == 2
    one_line_error(capsys, "$AEPRETRAIN_CPU_BF16 must be 1 (bf16 on the CPU) or 0 (fp32), or unset to ask the "
                           "CPU, not 'yes'")
    assert not (tmp_path / "run").exists()


def test_bench_forced_to_bf16_adds_a_bf16_row_in_a_process_of_its_own() -> None:
    """The fp32-only path is test_benchmark's first test (forced off); this one reaches a new process, which the
    CLI restarts under tcmalloc for `bench`."""
    env = dict(os.environ, AEPRETRAIN_CPU_BF16="1")
    result = subprocess.run([sys.executable, "-m", "aepretrain", "bench", "--preset", "tiny", "--size", "16",
                             "--batch", "8", "--steps", "1", "--warmup", "1", "--models", "classifier", "--json"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [(r["model"], r["precision"]) for r in report["rows"]] == [("classifier", "32"),
                                                                      ("classifier", "bf16-mixed")]
    assert set(report["matmul_gflops"]) == {"fp32", "bf16"} and report["matmul_gflops"]["bf16"] > 0
    bf16 = report["rows"][1]
    assert bf16["fraction_of_matmul"] == pytest.approx(bf16["achieved_gflops"] / report["matmul_gflops"]["bf16"],
                                                       rel=0.02, abs=0.002)
