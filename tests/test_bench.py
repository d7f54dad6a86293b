import json

import pytest

from aepretrain.cli import main


def test_bench_reports_every_model_with_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--preset", "quick", "--size", "16", "--batch", "8", "--steps", "2", "--warmup", "1",
            "--precisions", "32", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"device", "matmul_gflops", "rows"} and report["matmul_gflops"]["fp32"] > 0
    assert [r["model"] for r in report["rows"]] == ["classifier", "stage1", "stage2", "stage3"]
    keys = {"model", "size", "batch", "precision", "step_img_s", "loop_img_s", "infer_img_s", "gflop_per_img",
            "achieved_gflops", "fraction_of_matmul"}
    for row in report["rows"]:
        assert set(row) == keys and row["size"] == 16 and row["precision"] == "32"
        assert row["step_img_s"] > 0 and row["loop_img_s"] > 0 and row["gflop_per_img"] > 0
    # the stage-3 autoencoder does more arithmetic per image than stage 1
    assert report["rows"][3]["gflop_per_img"] > report["rows"][1]["gflop_per_img"]
