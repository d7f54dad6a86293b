"""The greedy stages' objectives and what a stage leaves frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.data import prepare
from aepretrain.data.loading import loader
from aepretrain.models import Autoencoder, build_encoder
from aepretrain.losses import masked_mse, patch_mask
from aepretrain.pretrain import StageModule, pretrain, stage_module
from aepretrain.training import trainer

from .conftest import photo, tiny

TINY = tiny()


def _stage_module(objective: str) -> StageModule:
    cfg = resolve("quick", overrides=[f"pretrain.objective={objective}", "pretrain.noise_std=0.3",
                                      "pretrain.mask_patch=4", "pretrain.mask_ratio=0.5"],
                  **{"data.image_size": 16, "trainer.precision": "32"})
    torch.manual_seed(0)
    module = stage_module(Autoencoder(build_encoder(cfg.model, 1, for_classifier=False), 1), cfg)
    return module.eval()


def test_denoising_loss_is_mse_of_the_noisy_input_s_reconstruction_against_the_clean_one() -> None:
    module = _stage_module("greedy-denoising")
    x = torch.rand(3, 1, 16, 16)
    torch.manual_seed(5)
    with torch.no_grad():
        loss = module._loss(x)
    torch.manual_seed(5)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        expected = ((module(noisy) - x) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    with torch.no_grad():
        plain = F.mse_loss(module(x), x)
    assert abs(float(loss) - float(plain)) > 1e-6  # the noise reached the input


def test_masked_loss_is_mse_over_masked_pixels_of_the_masked_input_s_reconstruction() -> None:
    module = _stage_module("greedy-masked")
    x = torch.rand(2, 1, 16, 16)
    torch.manual_seed(9)
    with torch.no_grad():
        loss = module._loss(x)
    torch.manual_seed(9)
    grid = torch.rand(2, 1, 4, 4) < 0.5  # 16 px / 4 px patches: a 4 x 4 grid of patches per image
    mask = grid.repeat_interleave(4, 2).repeat_interleave(4, 3).float()
    with torch.no_grad():
        squared = (module(x * (1 - mask)) - x) ** 2
    expected = (squared * mask).sum() / mask.sum()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_masked_loss_counts_only_masked_pixels() -> None:
    torch.manual_seed(0)
    target = torch.rand(2, 3, 16, 16)
    mask = patch_mask(target, 4, 0.5)
    assert set(mask.unique().tolist()) == {0.0, 1.0} and mask.shape == (2, 1, 16, 16)
    recon = torch.rand(2, 3, 16, 16)
    changed = recon + (1 - mask) * 100  # wildly wrong, but only where nothing is masked
    assert masked_mse(changed, target, mask) == pytest.approx(float(masked_mse(recon, target, mask)))
    expected = ((recon - target) ** 2 * mask).sum() / (mask.sum() * 3)
    assert masked_mse(recon, target, mask) == pytest.approx(float(expected))


def test_end_to_end_objective_trains_every_block(tmp_path: Path) -> None:
    cfg = resolve("quick", overrides=["pretrain.epochs=1", "pretrain.objective=end-to-end"],
                  **{"data.dataset": "synthetic", "data.image_size": 16, "trainer.progress": False,
                     "trainer.precision": "32"})
    bundle = prepare(cfg.data, 0)
    torch.manual_seed(cfg.seed)
    from aepretrain.models import build_encoder

    initial = build_encoder(cfg.model, 3, for_classifier=False).state_dict()
    result = pretrain(cfg, bundle, tmp_path)
    assert [s.summary["stage"] for s in result.stages] == [3]  # one stage: all blocks and the full decoder
    assert result.stages[0].summary["params"]["non_trainable"] == sum(  # BatchNorm statistics only: nothing frozen
        2 * m.num_features for m in result.autoencoders[0].modules() if isinstance(m, torch.nn.BatchNorm2d))
    trained = result.encoder.state_dict()
    for b in range(3):
        key = f"blocks.{b}.conv1.weight"
        assert not torch.equal(initial[key], trained[key]), f"block {b + 1} did not train"


def test_pretraining_on_an_unlabelled_folder_end_to_end(tmp_path: Path) -> None:
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i in range(30):
        photo(i, size=(20, 20)).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *TINY, "--pretrain-data", str(folder),
                 "--set", "data.ae_fraction=1.0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["pretrain"]["images"] == 30 and "unlabelled" in m["pretrain"]["data"]
    assert "no labelled test image" in m["pretrain"]["data"]
    assert {(r["encoder"], r["depth"]) for r in m["probes"]} == {(e, d) for e in ("pretrained", "random")
                                                                 for d in (1, 2, 3)}
    tests = m["dataset"]["test"]  # each accuracy is a count of the labelled test images, over all of them
    assert all(abs(r[key] * tests - round(r[key] * tests)) < 1e-4 for r in m["probes"]
               for key in ("linear_test", "knn_test"))
    assert max(r["linear_test"] for r in m["probes"]) >= 0.25 + 0.4  # 4 separable classes: far above chance
    report = (out / "report.md").read_text()
    assert "3b. Probes" in report and "unlabelled" in report


def test_frozen_blocks_do_not_change_during_a_later_stage(tmp_path: Path) -> None:
    cfg = resolve("quick", **{"data.dataset": "synthetic", "data.image_size": 16, "trainer.progress": False,
                              "trainer.precision": "32"})
    bundle = prepare(cfg.data, 0)
    encoder = build_encoder(cfg.model, 3, for_classifier=False)
    for block in encoder.blocks:  # non-trivial statistics, so that a change would show
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in encoder.blocks[:2].state_dict().items()}
    stage3 = Autoencoder(encoder, 3)
    fit = trainer(cfg.trainer, tmp_path, "stage3", 2, [])
    fit.fit(stage_module(stage3, cfg), loader(bundle.ae, 16, True, cfg.seed))
    after = encoder.blocks[:2].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "blocks 1-2 changed while frozen"
    assert not torch.equal(encoder.blocks[2].bn1.running_mean, torch.full_like(encoder.blocks[2].bn1.running_mean, 0.3))
