"""The core claim, by value (issue 19, item 18): the pre-trained arm starts from exactly the last greedy stage's
encoder weights, both arms start from the same head, and each greedy stage k leaves blocks 1..k-1 (weights and
BatchNorm statistics) bit-identical to stage k-1's checkpoint while block k trains.

The weights a fit starts from are read as its first training forward pass begins (a global forward pre-hook: it
watches, it changes nothing), and compared with the checkpoints' tensors as the files hold them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aepretrain.cli import main
from aepretrain.models import Autoencoder, Classifier

from .conftest import tiny

TINY = tiny("probe.enabled=false")
DEPTH = 3  # the tiny preset's blocks
State = dict[str, torch.Tensor]


@contextmanager
def fits_start_from() -> Iterator[dict[type, list[State]]]:
    """The state of each classifier and autoencoder as its first forward pass in training mode begins: the weights
    and BatchNorm statistics its fit starts from (a fit runs no validation before its first step)."""
    started: dict[type, list[State]] = {Classifier: [], Autoencoder: []}
    seen: list[torch.nn.Module] = []

    def record(module: torch.nn.Module, _inputs: tuple) -> None:
        kind = type(module)
        if kind in started and module.training and torch.is_grad_enabled() and not any(m is module for m in seen) \
                and not any(t.is_meta for t in module.state_dict().values()):
            seen.append(module)
            started[kind].append({k: v.detach().clone() for k, v in module.state_dict().items()})

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield started
    finally:
        handle.remove()


def blocks(state: State, prefix: str = "") -> list[State]:
    """The tensors of each encoder block, in block order, keyed by their name inside the block."""
    grouped: dict[int, State] = {}
    for key, tensor in state.items():
        found = re.fullmatch(re.escape(prefix) + r"blocks\.(\d+)\.(.+)", key)
        if found:
            grouped.setdefault(int(found[1]), {})[found[2]] = tensor
    return [grouped[b] for b in sorted(grouped)]


def identical(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stage_file(out: Path, stage: int) -> State:
    return load_file(str(out / "checkpoints" / f"pretrain-stage{stage}.safetensors"))


CAPTURED: dict[str, tuple[Path, dict[type, list[State]]]] = {}


def captured_run(objective: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[type, list[State]]]:
    """A tiny run (greedy: the whole run, both arms; the other objectives: pre-training), with what each fit
    started from; once per objective."""
    if objective not in CAPTURED:
        out = tmp_path_factory.mktemp(objective) / "run"
        command = "run" if objective == "greedy" else "pretrain"
        with fits_start_from() as started:
            assert main([command, "--out", str(out), *TINY, "--objective", objective]) == 0
        CAPTURED[objective] = out, started
    return CAPTURED[objective]


def test_the_pretrained_arm_starts_from_the_last_stage_s_encoder_and_both_arms_from_one_head(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    out, started = captured_run("greedy", tmp_path_factory)
    arms = list(json.loads((out / "metrics.json").read_text())["finetune"])  # in the order they were fitted
    assert arms == ["pretrained", "scratch"] and len(started[Classifier]) == 2
    start = dict(zip(arms, started[Classifier]))
    last_stage = stage_file(out, DEPTH)
    encoder = {k: v for k, v in last_stage.items() if k.startswith("blocks.")}
    pretrained = {k.removeprefix("encoder."): v for k, v in start["pretrained"].items() if k.startswith("encoder.")}
    assert len(blocks(encoder)) == DEPTH and identical(pretrained, encoder)  # weights and BatchNorm statistics
    scratch = {k.removeprefix("encoder."): v for k, v in start["scratch"].items() if k.startswith("encoder.")}
    assert not torch.equal(scratch["blocks.0.conv1.weight"], encoder["blocks.0.conv1.weight"])
    assert all(int(v) == 0 for k, v in scratch.items() if k.endswith("num_batches_tracked"))  # untrained
    pretrained_head, scratch_head = ({k: v for k, v in start[arm].items() if not k.startswith("encoder.")}
                                     for arm in arms)
    assert pretrained_head and identical(pretrained_head, scratch_head)


def test_finetune_from_an_encoder_file_starts_from_its_weights(tmp_path_factory: pytest.TempPathFactory,
                                                               tmp_path: Path) -> None:
    out, _ = captured_run("greedy", tmp_path_factory)
    encoder_file = out / "checkpoints" / f"pretrain-stage{DEPTH}.safetensors"
    with fits_start_from() as started:
        assert main(["finetune", "--init", "pretrained", "--encoder", str(encoder_file), "--out", str(tmp_path / "f"),
                     *TINY, "--set", "finetune.epochs=1"]) == 0
    assert len(started[Classifier]) == 1
    start = {k.removeprefix("encoder."): v for k, v in started[Classifier][0].items() if k.startswith("encoder.")}
    assert identical(start, {k: v for k, v in load_file(str(encoder_file)).items() if k.startswith("blocks.")})


@pytest.mark.parametrize("objective", ["greedy", "greedy-denoising", "greedy-masked"])
def test_each_greedy_stage_leaves_earlier_blocks_bit_identical_and_trains_its_own(
        objective: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    out, started = captured_run(objective, tmp_path_factory)
    assert len(started[Autoencoder]) == DEPTH
    finished = [blocks(stage_file(out, k)) for k in range(1, DEPTH + 1)]
    for k in range(1, DEPTH + 1):
        start, end = blocks(started[Autoencoder][k - 1]), finished[k - 1]
        assert len(start) == len(end) == k
        for b in range(k - 1):  # frozen: given over from stage k-1 and returned unchanged, statistics included
            given = finished[k - 2][b]
            assert identical(start[b], given), f"stage {k} did not start from stage {k - 1}'s block {b + 1}"
            assert identical(end[b], given), f"stage {k} changed frozen block {b + 1}"
        trained = [name for name in start[k - 1] if name.endswith(("weight", "running_mean", "running_var"))]
        assert trained and all(not torch.equal(start[k - 1][n], end[k - 1][n]) for n in trained), f"stage {k}"
        counts = [n for n in start[k - 1] if n.endswith("num_batches_tracked")]
        assert counts and all(int(end[k - 1][n]) > int(start[k - 1][n]) for n in counts), f"stage {k}"
