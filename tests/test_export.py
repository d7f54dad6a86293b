"""Export: ONNX and TorchScript give PyTorch's outputs on real photos; a backbone loads as a plain nn.Module."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import aepretrain
from aepretrain.checkpoints import load_autoencoder, load_classifier
from aepretrain.cli import main
from aepretrain.prediction import prepare_image

EXTRA = "the export extra is not installed: pip install 'aepretrain[export]'"


def checkpoint(run: Path, name: str = "classifier-pretrained") -> Path:
    return run / "checkpoints" / f"{name}.safetensors"


@pytest.fixture
def photos(pets_sample: Path, small_run: Path) -> torch.Tensor:
    """Eight real photos of the shared sample, as the classifier takes them: float NCHW in [0, 1]."""
    meta = load_classifier(checkpoint(small_run))[1]
    files = sorted((pets_sample / "images").glob("*.jpg"))[::75]
    pixels = np.stack([prepare_image(f, meta["image_size"], meta["in_channels"]) for f in files])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)


def pytorch_outputs(run: Path, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    classifier = load_classifier(checkpoint(run))[0]
    with torch.no_grad():
        logits = classifier(images)
    return logits.numpy(), torch.softmax(logits, dim=1).numpy()


def test_onnx_equals_pytorch_on_real_photos(small_run: Path, photos: torch.Tensor, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    onnx = pytest.importorskip("onnx", reason=EXTRA)
    onnxruntime = pytest.importorskip("onnxruntime", reason=EXTRA)
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint(small_run)), "--format", "onnx", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"onnx: {out} (")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    meta = load_classifier(checkpoint(small_run))[1]
    assert json.loads(props["classes"]) == meta["classes"] == [f"pattern{k}" for k in range(4)]
    assert (json.loads(props["image_size"]), json.loads(props["in_channels"])) == (32, 3)
    assert "/ 255" in props["preprocessing"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis is dynamic
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, probabilities = pytorch_outputs(small_run, photos)
    for batch in (photos, photos[:1]):  # eight photos, then one: any batch size
        got_logits, got_probabilities = session.run(["logits", "probabilities"], {"image": batch.numpy()})
        assert got_logits.shape == (len(batch), 4)
        assert np.abs(got_logits - logits[:len(batch)]).max() < 1e-4
        assert np.abs(got_probabilities - probabilities[:len(batch)]).max() < 1e-4


def test_torchscript_loads_without_aepretrain_and_equals_pytorch(small_run: Path, photos: torch.Tensor,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    assert main(["export", "--checkpoint", str(checkpoint(small_run)), "--format", "torchscript", "--out", str(out)]) == 0
    torch.save(photos, tmp_path / "photos.pt")
    script = ("import sys, json, torch\n"
              "sys.modules['aepretrain'] = None  # any import of aepretrain fails from here\n"
              "extra = {'aepretrain.json': ''}\n"
              f"model = torch.jit.load({str(out)!r}, _extra_files=extra)\n"
              f"logits, probabilities = model(torch.load({str(tmp_path / 'photos.pt')!r}))\n"
              f"torch.save({{'logits': logits, 'probabilities': probabilities}}, {str(tmp_path / 'got.pt')!r})\n"
              "print(json.loads(extra['aepretrain.json'])['classes'])\n")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([f"pattern{k}" for k in range(4)])
    got = torch.load(tmp_path / "got.pt")
    logits, probabilities = pytorch_outputs(small_run, photos)
    assert np.abs(got["logits"].numpy() - logits).max() < 1e-4
    assert np.abs(got["probabilities"].numpy() - probabilities).max() < 1e-4


def test_backbone_features_equal_the_classifiers_pooled_features(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "encoder.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint(small_run)), "--format", "backbone", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        names, spec = set(f.keys()), json.loads(f.metadata()["spec"])
    assert {"blocks.0.conv1.weight", "blocks.0.bn1.running_var", "blocks.2.conv2.bias"} <= names
    assert json.loads((tmp_path / "encoder.json").read_text()) == spec
    classifier = load_classifier(checkpoint(small_run))[0]
    stride = classifier.encoder.stride
    assert (spec["first_stride"], spec["downsampling"], spec["in_channels"], spec["image_size"]) == (stride, stride * 8, 3, 32)
    encoder = aepretrain.load_encoder(out)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert encoder(x).shape == (3, spec["out_channels"], 32 // (stride * 8), 32 // (stride * 8))
        assert torch.allclose(encoder.features(x), classifier.features(x), atol=1e-6)
    head = torch.nn.Linear(spec["out_channels"], 5)  # dropped into another model, it trains
    head(encoder.features(x)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_backbone_from_an_autoencoder_stage_holds_its_blocks(small_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "stage2.safetensors"
    stage = checkpoint(small_run, "pretrain-stage2")
    assert main(["export", "--checkpoint", str(stage), "--format", "backbone", "--out", str(out)]) == 0
    spec = json.loads((tmp_path / "stage2.json").read_text())
    assert len(spec["blocks"]) == 2 and spec["first_stride"] == 1 and "autoencoder stage 2" in spec["source"]
    encoder, autoencoder = aepretrain.load_encoder(out), load_autoencoder(stage)[0]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(encoder(x), autoencoder.encode(x))
    assert torch.equal(aepretrain.load_encoder(stage).features(x), encoder.features(x))  # a checkpoint loads as it is


def test_export_refusals_are_one_line(small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    stage = checkpoint(small_run, "pretrain-stage1")
    assert main(["export", "--checkpoint", str(stage), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    assert "holds a autoencoder checkpoint; a classifier is needed" in capsys.readouterr().err.replace("an ", "a ")
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["export", "--checkpoint", str(tmp_path / "notes.txt"), "--format", "backbone",
                 "--out", str(tmp_path / "b.safetensors")]) == 2
    assert "is not an aepretrain checkpoint" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)  # as where the extra is not installed
    assert main(["export", "--checkpoint", str(checkpoint(small_run)), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == ("aepretrain: error: ONNX export needs onnx, which is not installed: "
                                       "pip install 'aepretrain[export]'\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing half-written
