"""Beyond the reference: objectives, unlabelled pre-training data, probes, and the label-efficiency study."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.data import prepare
from aepretrain.models import build_encoder
from aepretrain.probe import features
from aepretrain.pretrain import masked_mse, patch_mask, pretrain
from aepretrain.study import nested_fractions

from .conftest import photo

TINY = ["--dataset", "synthetic", "--image-size", "16", "--quiet", "--precision", "32",
        "--set", "pretrain.epochs=1", "--set", "finetune.epochs=2", "--set", "pretrain.batch_size=16",
        "--set", "finetune.batch_size=16", "--set", "data.synthetic_per_class=24"]


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
    assert [s["stage"] for s in result.stages] == [3]  # one stage: all blocks and the full decoder
    assert result.stages[0]["params"]["non_trainable"] == sum(  # BatchNorm statistics only: nothing frozen
        2 * m.num_features for m in result.autoencoders[0].modules() if isinstance(m, torch.nn.BatchNorm2d))
    trained = result.encoder.state_dict()
    for b in range(3):
        key = f"blocks.{b}.conv1.weight"
        assert not torch.equal(initial[key], trained[key]), f"block {b + 1} did not train"


@pytest.mark.parametrize("objective", ["greedy-denoising", "greedy-masked"])
def test_greedy_variants_train_one_block_per_stage(objective: str, tmp_path: Path) -> None:
    cfg = resolve("quick", overrides=["pretrain.epochs=1", f"pretrain.objective={objective}"],
                  **{"data.dataset": "synthetic", "data.image_size": 16, "trainer.progress": False,
                     "trainer.precision": "32"})
    result = pretrain(cfg, prepare(cfg.data, 0), tmp_path)
    assert [s["stage"] for s in result.stages] == [1, 2, 3]
    assert all(np.isfinite(s["train_loss"]) for s in result.stages) and result.test_mse > 0


def test_label_fractions_are_stratified_and_nested() -> None:
    labels = np.repeat(np.arange(4), 100)
    subsets = nested_fractions(labels, [0.01, 0.1, 0.5, 1.0], seed=3)
    assert np.bincount(labels[subsets[0.1]]).tolist() == [10, 10, 10, 10]
    assert np.bincount(labels[subsets[0.01]]).tolist() == [1, 1, 1, 1]
    assert len(subsets[1.0]) == 400
    for small, large in ((0.01, 0.1), (0.1, 0.5), (0.5, 1.0)):
        assert set(subsets[small]) <= set(subsets[large])
    other = nested_fractions(labels, [0.1], seed=4)
    assert not np.array_equal(other[0.1], subsets[0.1])


def test_probe_features_of_every_depth_from_one_pass_match_a_pass_per_depth() -> None:
    torch.manual_seed(0)
    encoder = build_encoder(resolve("quick").model, 1, for_classifier=False)
    images = torch.randint(0, 256, (6, 16, 16, 1), dtype=torch.uint8)
    by_depth = features(encoder, images)
    x = images.permute(0, 3, 1, 2).float() / 255
    assert [tuple(f.shape) for f in by_depth] == [(6, 16), (6, 32), (6, 64)]
    with torch.no_grad():
        for depth, f in enumerate(by_depth, 1):
            assert torch.allclose(f, encoder.eval()(x, depth).mean(dim=(2, 3)), atol=1e-6)


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
    assert all(0 <= r["linear_test"] <= 1 and 0 <= r["knn_test"] <= 1 for r in m["probes"])
    report = (out / "report.md").read_text()
    assert "3b. Probes" in report and "unlabelled" in report


def test_study_resumes_without_redoing_finished_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    args = ["study", "--out", str(out), *TINY, "--label-fractions", "0.25,1", "--seeds", "2",
            "--set", "study.epochs=1", "--set", "study.min_steps=2", "--set", "study.val_limit=null"]
    assert main(args) == 0
    record = json.loads((out / "study.json").read_text())
    assert len(record["cells"]) == 2 * 2 * 2  # fractions x arms x seeds
    train = prepare(resolve("quick", **{"data.dataset": "synthetic", "data.image_size": 16,
                                        "data.synthetic_per_class": 24}).data, 0).train
    expected = {f: len(idx) for f, idx in nested_fractions(train.labels, [0.25, 1.0], 0).items()}
    assert {(c["fraction"], c["labelled"]) for c in record["cells"]} == set(expected.items())
    assert expected[1.0] == len(train)
    assert {r["arm"] for r in record["summary"]} == {"scratch", "greedy"}
    assert all("verdict" in r for r in record["summary"] if r["arm"] == "greedy")
    for name in ("study.csv", "study.md", "study.html", "figures/study.png"):
        assert (out / name).is_file()
    finished = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.safetensors")}
    dropped = record["cells"].pop()  # as if the study had been killed before its last cell
    (out / "study.json").write_text(json.dumps(record))
    dropped_folder = out / "cells" / f"f{dropped['fraction']:g}-{dropped['arm']}-seed{dropped['seed']}"
    shutil.rmtree(dropped_folder)
    assert main(args) == 0
    again = json.loads((out / "study.json").read_text())
    assert len(again["cells"]) == 8
    redone = [c for c in again["cells"] if (c["fraction"], c["arm"], c["seed"]) ==
              (dropped["fraction"], dropped["arm"], dropped["seed"])]
    assert len(redone) == 1 and redone[0]["test_accuracy"] == pytest.approx(dropped["test_accuracy"])
    for path, mtime in finished.items():
        if dropped_folder not in path.parents:
            assert path.stat().st_mtime_ns == mtime, f"{path} was trained again"
