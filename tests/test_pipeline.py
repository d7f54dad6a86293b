import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from safetensors.torch import load_file

from aepretrain.checkpoints import load_classifier, load_stage_encoder
from aepretrain.cli import main

from .conftest import photo, tiny

TINY = tiny("pretrain.epochs=2", "finetune.epochs=3")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["run", "--out", str(out), *TINY]) == 0
    return out


def test_run_writes_every_key_file_and_figure(tiny_run: Path) -> None:
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert {"train", "val", "test", "ae", "classes"} <= set(m["dataset"])
    assert m["precision"] == "32" and m["preset"] == "tiny"
    stages = m["pretrain"]["stages"]
    assert [s["stage"] for s in stages] == [1, 2, 3]
    for s in stages:
        assert {"epochs", "train_loss", "val_loss", "seconds", "params"} <= set(s) and s["epochs"] == 2
        assert set(s["params"]) == {"total", "trainable", "non_trainable"}
    assert m["pretrain"]["test_mse"] > 0
    for arm in ("pretrained", "scratch"):
        r = m["finetune"][arm]
        assert {"test_loss", "test_accuracy", "best_val_accuracy", "epochs", "epochs_to_target", "seconds"} <= set(r)
        assert r["epochs"] == 3  # too short to learn: see test_reliability
        confusion = np.array(r["confusion"])  # every test image counted once; accuracy is its diagonal's share
        assert confusion.sum() == m["dataset"]["test"] and confusion.shape == (4, 4)
        assert r["test_accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum(), rel=1e-6)
    assert m["target_accuracy"] == pytest.approx(0.95 * m["finetune"]["scratch"]["best_val_accuracy"])
    for name in ("report.md", "report.html", "config.yaml", "data.json"):
        assert (tiny_run / name).is_file()
    for fig in ("samples", "reconstructions", "pretrain-curves", "finetune-curves", "confusion-pretrained",
                "confusion-scratch", "predictions", "probes"):
        assert Image.open(tiny_run / "figures" / f"{fig}.png").size[0] > 100
    ckpts = tiny_run / "checkpoints"
    for name in ("pretrain-stage1", "pretrain-stage2", "pretrain-stage3", "classifier-pretrained", "classifier-scratch"):
        assert (ckpts / f"{name}.safetensors").is_file()
    assert (tiny_run / "logs" / "scratch" / "metrics.csv").is_file()
    assert list((tiny_run / "logs" / "stage1").glob("events.out.tfevents.*"))
    html = (tiny_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 8 and "1,128,997" in html and "66.78 %" in html


def test_predict_top3_sorted_and_summing_to_at_most_one(tiny_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    photo(5, size=(300, 200)).save(tmp_path / "cat.png")
    ckpt = tiny_run / "checkpoints" / "classifier-pretrained.safetensors"
    assert main(["predict", str(tmp_path / "cat.png"), "--checkpoint", str(ckpt), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    probs = [t["probability"] for t in rows[0]["top"]]
    assert rows[0]["image"].endswith("cat.png") and len(probs) == 3
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-9
    assert {t["class"] for t in rows[0]["top"]} <= {f"pattern{k}" for k in range(4)}


def test_predict_refuses_non_images_and_wrong_checkpoints(tiny_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    ckpt = tiny_run / "checkpoints" / "classifier-pretrained.safetensors"
    assert main(["predict", str(tmp_path / "notes.txt"), "--checkpoint", str(ckpt)]) == 2
    assert "not an image" in capsys.readouterr().err
    stage = tiny_run / "checkpoints" / "pretrain-stage1.safetensors"
    assert main(["predict", str(tmp_path / "notes.txt"), "--checkpoint", str(stage)]) == 2
    assert "holds an autoencoder checkpoint; a classifier is needed" in capsys.readouterr().err


def test_checkpoints_load_into_the_classifier(tiny_run: Path) -> None:
    path = tiny_run / "checkpoints" / "classifier-scratch.safetensors"
    clf, meta = load_classifier(path)
    assert meta["classes"] == [f"pattern{k}" for k in range(4)] and meta["image_size"] == 16
    assert clf(torch.rand(2, 3, 16, 16)).shape == (2, 4)
    saved, loaded = load_file(str(path)), clf.state_dict()  # every tensor as the file holds it, none left as built
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    stage = tiny_run / "checkpoints" / "pretrain-stage3.safetensors"
    encoder = load_stage_encoder(stage)[0].state_dict()
    blocks = {k: v for k, v in load_file(str(stage)).items() if k.startswith("blocks.")}
    assert blocks.keys() == encoder.keys() and all(torch.equal(blocks[k], encoder[k]) for k in blocks)


def test_evaluate_command(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tiny_run / "checkpoints" / "classifier-pretrained.safetensors"
    data = ["--dataset", "synthetic", "--image-size", "16", "--set", "data.synthetic_per_class=24"]
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tiny_run / "eval"), "--json", *data]) == 0
    scores = json.loads(capsys.readouterr().out)
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert scores["test_accuracy"] == pytest.approx(m["finetune"]["pretrained"]["test_accuracy"])
    assert len(scores["per_class_accuracy"]) == 4 and Path(scores["figure"]).is_file()


def test_run_refuses_a_folder_holding_another_run(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--out", str(tiny_run), *TINY]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err


def test_report_rebuilds_from_the_run_folder(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tiny_run / "report.md").unlink()
    assert main(["report", str(tiny_run)]) == 0
    assert "## 3. Greedy layer-wise pre-training" in (tiny_run / "report.md").read_text()


def test_seed_preset_smoke_runs_on_the_cpu(tmp_path: Path) -> None:
    assert main(["run", "--preset", "seed", "--smoke", "--dataset", "synthetic", "--quiet", "--precision", "32",
                 "--out", str(tmp_path / "seed")]) == 0
    m = json.loads((tmp_path / "seed" / "metrics.json").read_text())
    assert m["pretrain"]["stages"][2]["params"]["total"] == 3_148_803
    assert np.isfinite(m["finetune"]["scratch"]["test_loss"])
