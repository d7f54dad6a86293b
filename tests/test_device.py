"""Testing, probing, predicting and reconstructing on the fit's device (:func:`aepretrain.training.fit_device`).

Only the CPU runs here: the CUDA path (pinned batches, ``non_blocking`` transfers, the model moved to the GPU and
back) is exercised by ``benchmarks/gpu_check.sh`` on a machine with one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aepretrain.checkpoints import load_autoencoder, load_classifier
from aepretrain.cli import main
from aepretrain.config import TrainerConfig, resolve
from aepretrain.data import prepare
from aepretrain.errors import UserError
from aepretrain.evaluate import evaluate
from aepretrain.prediction import top_k
from aepretrain.pretrain import reconstruct
from aepretrain.probe import probes
from aepretrain.training import fit_device
from aepretrain.transforms import pixels
from tests.test_hostile import one_line_error

CPU = torch.device("cpu")
NO_GPU = not torch.cuda.is_available() and not torch.backends.mps.is_available()


def test_fit_device_is_the_cpu_for_cpu_and_for_auto_without_a_gpu() -> None:
    assert fit_device(TrainerConfig(device="cpu")) == CPU
    assert fit_device(TrainerConfig(device="cpu", devices="3")) == CPU  # a count of processes, not a GPU index
    if NO_GPU:
        assert fit_device(TrainerConfig(device="auto")) == CPU
    elif torch.cuda.is_available():
        assert fit_device(TrainerConfig(device="auto")) == torch.device("cuda", 0)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_a_gpu_device_without_a_gpu_is_refused_in_one_line(device: str, small_run: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=f"^trainer.device is {device}, but this machine has no CUDA GPU"):
        fit_device(TrainerConfig(device=device))
    checkpoint = small_run / "checkpoints" / "classifier-pretrained.safetensors"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--dataset", "synthetic", "--image-size", "32",
            "--set", "data.synthetic_per_class=16", "--set", f"trainer.device={device}"]
    assert main(args) == 2
    one_line_error(capsys, f"trainer.device is {device}, but this machine has no CUDA GPU: choose device auto or cpu")


def test_scores_probes_predictions_and_reconstructions_on_the_cpu_device_equal_the_models_own(small_run: Path
                                                                                               ) -> None:
    """A real run's classifier and autoencoders, given the device explicitly: the same numbers to the last bit,
    and each model left on its device in the mode it was in."""
    classifier, meta = load_classifier(small_run / "checkpoints" / "classifier-pretrained.safetensors")
    cfg = meta["config"]
    bundle = prepare(cfg.data, meta["split_seed"])
    classifier.train()
    scores = evaluate(classifier, bundle.test, bundle.classes, CPU)
    assert classifier.training and next(classifier.parameters()).device == CPU
    assert scores == evaluate(classifier, bundle.test, bundle.classes)
    assert 0 < scores["test_accuracy"] <= 1 and sum(map(sum, scores["confusion"])) == len(bundle.test)
    shown = bundle.test.images[:4]
    assert top_k(classifier, bundle.classes, shown, 3, CPU) == top_k(classifier, bundle.classes, shown, 3)

    encoder = classifier.encoder
    rows = probes(bundle, encoder, train_limit=None, seed=0, device=CPU)
    assert rows == probes(bundle, encoder, train_limit=None, seed=0)
    assert [(r["encoder"], r["depth"]) for r in rows] == [(e, d) for e in ("pretrained", "random") for d in (1, 2, 3)]

    autoencoder = load_autoencoder(small_run / "checkpoints" / "pretrain-stage3.safetensors")[0]
    originals = pixels(np.asarray(bundle.test.images[:2]))
    on_cpu, own = reconstruct([autoencoder], originals, CPU), reconstruct([autoencoder], originals)
    assert torch.equal(on_cpu[0], own[0]) and on_cpu[0].shape == originals.shape
    assert not autoencoder.training  # loaded for inference: left so
