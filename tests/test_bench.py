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


def test_counted_flops_match_a_hand_count_and_rates_follow_from_them(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from aepretrain.bench import train_flops_per_image
    from aepretrain.config import resolve
    from aepretrain.models import Classifier, build_encoder

    spec = resolve("quick").model
    model = Classifier(build_encoder(spec, 1, True), 10, spec.dropout)
    forward = []  # multiply-adds of each convolution and dense layer, counted by hand from its output's shape

    def count(m: torch.nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        per_output = m.in_channels * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, torch.nn.Conv2d) \
            else m.in_features
        forward.append(2 * per_output * out[0].numel())

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.register_forward_hook(count)
    x, y = torch.rand(2, 1, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        model(x)
    hand = sum(forward)  # per image: each hook counted one image's output (out[0])
    counted = train_flops_per_image("classifier", model, x, y)
    # a train step: the forward, the weight gradients, and the input gradients of all but the first layer
    assert 2 * hand < counted <= 3 * hand

    assert main(["bench", "--preset", "quick", "--size", "32", "--batch", "8", "--steps", "2", "--warmup", "1",
                 "--precisions", "32", "--models", "classifier", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["rows"][0]
    assert row["gflop_per_img"] == pytest.approx(counted / 1e9, abs=0.0006)  # the same model, size and count
    assert row["achieved_gflops"] == pytest.approx(counted / 1e9 * row["step_img_s"], rel=0.01, abs=0.06)
    assert row["fraction_of_matmul"] == pytest.approx(row["achieved_gflops"] / report["matmul_gflops"]["fp32"],
                                                      rel=0.02, abs=0.002)
