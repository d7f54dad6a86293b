import json

import pytest
import torch

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.models import Autoencoder, Classifier, build_encoder
from aepretrain.reference import REFERENCE

# The reference's output shapes (../shared/SPEC.md) at a few layers.
SPEC_SHAPES = {"encoder.blocks.0.conv1": [112, 112, 64], "encoder.blocks.0.pool": [56, 56, 64],
               "encoder.blocks.1.pool": [28, 28, 128], "encoder.blocks.2.pool": [14, 14, 256], "dense": [37]}


def test_seed_summary_matches_the_reference_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--preset", "seed", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    clf = info["classifier"]
    assert clf["total"] == REFERENCE["classifier_total"] == 1_128_997
    assert [layer["params"] for layer in clf["layers"]] == REFERENCE["classifier_layers"]
    shapes = {layer["name"]: layer["output_shape"] for layer in clf["layers"]}
    assert all(shapes[name] == shape for name, shape in SPEC_SHAPES.items())
    counts = [(s["total"], s["trainable"], s["non_trainable"]) for s in info["stages"]]
    assert counts == [stage["params"] for stage in REFERENCE["stages"]]
    last = info["stages"][2]["layers"][-1]
    assert last["name"] == "decoder.output" and last["output_shape"] == [224, 224, 3]


def test_summary_text_lists_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--preset", "seed"]) == 0
    out = capsys.readouterr().out
    assert "total 1,128,997" in out and "total 3,148,803  trainable 2,913,923  non-trainable 234,880" in out


def test_autoencoder_output_matches_input_and_classifier_has_no_decoder() -> None:
    spec = resolve("quick").model
    x = torch.rand(2, 1, 32, 32)
    encoder = build_encoder(spec, 1, for_classifier=False)
    for stage in (1, 2, 3):
        assert Autoencoder(encoder, stage)(x).shape == x.shape
    clf = Classifier(build_encoder(spec, 1, True), 10, 0.2)
    assert clf(x).shape == (2, 10)
    assert not any("decoder" in k for k in clf.state_dict())


def test_strided_first_convolution_still_reconstructs_full_size() -> None:
    spec = resolve("quick", overrides=["model.autoencoder_stride=2"]).model
    encoder = build_encoder(spec, 1, for_classifier=False)
    assert Autoencoder(encoder, 3)(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)
