import json

import pytest

from aepretrain.benchmark import step_plan
from aepretrain.cli import main


def test_bench_reports_every_model_with_the_documented_keys(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEPRETRAIN_CPU_BF16", "0")  # fp32 rows only, on any CPU; test_messages forces bf16 on
    args = ["bench", "--preset", "quick", "--size", "16", "--batch", "8", "--steps", "2", "--warmup", "1", "--json"]
    assert main(args) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    progress = [line for line in captured.err.splitlines() if line.startswith("bench:")]  # matmul, then a model each
    assert len(progress) == 5 and progress[0].startswith("bench: matmul fp32")
    assert progress[4].startswith("bench: [4/4] stage3 32 at 16 px, batch 8: step ")
    assert set(report) >= {"device", "matmul_gflops", "rows"} and list(report["matmul_gflops"]) == ["fp32"]
    assert report["matmul_gflops"]["fp32"] > 0
    assert [r["model"] for r in report["rows"]] == ["classifier", "stage1", "stage2", "stage3"]
    keys = {"model", "size", "batch", "precision", "step_img_s", "loop_img_s", "infer_img_s", "gflop_per_img",
            "achieved_gflops", "fraction_of_matmul", "timed_steps"}
    for row in report["rows"]:
        assert set(row) == keys and row["size"] == 16 and row["precision"] == "32"
        assert row["timed_steps"]["infer"] >= 1 and row["timed_steps"]["step"] <= 2
        assert row["step_img_s"] > 0 and row["loop_img_s"] > 0 and row["gflop_per_img"] > 0
    # the stage-3 autoencoder does more arithmetic per image than stage 1
    assert report["rows"][3]["gflop_per_img"] > report["rows"][1]["gflop_per_img"]


def test_counted_flops_match_a_hand_count_and_rates_follow_from_them(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from aepretrain.benchmark import train_flops_per_image
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


@pytest.mark.parametrize("seconds_per_step, budget, expected", [
    (0.01, 10.0, (3, 10)),  # fast: every warm-up and timed step asked for
    (0.01, 0.0, (3, 10)),  # 0: no limit
    (1.0, 10.0, (3, 7)),  # three timed steps first, then warm-ups, then more timed steps up to the budget
    (2.5, 10.0, (1, 3)),
    (6.0, 10.0, (1, 1)),
    (60.0, 10.0, (1, 1)),  # slower than the budget: one warm-up, one timed step, never none
])
def test_step_plan_fits_the_budget_with_fewer_steps_for_slow_models(seconds_per_step: float, budget: float,
                                                                     expected: tuple[int, int]) -> None:
    warm, timed = step_plan(seconds_per_step, warmup=3, steps=10, budget=budget)
    assert (warm, timed) == expected
    if budget and expected != (1, 1):
        assert (warm + timed) * seconds_per_step <= budget


def test_step_plan_lets_a_warm_loop_start_timing_at_once() -> None:
    assert step_plan(60.0, warmup=3, steps=10, budget=10.0, least_warmup=0) == (0, 1)
    assert step_plan(3.0, warmup=3, steps=10, budget=10.0, least_warmup=0) == (0, 3)
