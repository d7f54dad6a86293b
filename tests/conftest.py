"""Shared test fixtures: tiny real data sets built on disk, and the shared sample where it exists."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AEPRETRAIN_SHARED", REPO.parent / "shared"))
PETS_SAMPLE = SHARED / "data" / "oxford-pets-sample"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
FASHION = DEBIAN_FASHION if DEBIAN_FASHION.is_dir() else SHARED / "data" / "fashion-mnist"


def tiny(*settings: str) -> list[str]:
    """CLI arguments of a run in seconds (the `tiny` preset), with ``settings`` as KEY=VALUE overrides."""
    return ["--preset", "tiny", "--quiet", *(arg for kv in settings for arg in ("--set", kv))]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["AEPRETRAIN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def pets_sample() -> Path:
    if not PETS_SAMPLE.is_dir():
        pytest.skip(f"the shared Oxford-IIIT Pet sample is absent ({PETS_SAMPLE}): a user's machine has none")
    return PETS_SAMPLE


@pytest.fixture
def fashion_root() -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST is absent ({DEBIAN_FASHION} and {FASHION}): apt-get install dataset-fashion-mnist")
    return FASHION


def photo(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def numbers(out: Path) -> dict:
    """metrics.json without what legitimately differs between runs: timings and resume bookkeeping."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()
                    if k not in ("seconds", "val_seconds", "resumed_from", "checkpoint")}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return strip(json.loads((out / "metrics.json").read_text()))


def make_oxford(root: Path, breeds: dict[str, int], per_breed: int = 6, comments: bool = False) -> Path:
    """A tiny data set in the official Oxford-IIIT Pet layout, with real JPEG files."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    trainval, test = [], []
    for b, (breed, class_id) in enumerate(breeds.items()):
        for i in range(1, per_breed + 1):
            name = f"{breed}_{i}"
            photo(b * 100 + i).save(root / "images" / f"{name}.jpg", "JPEG")
            (trainval if i <= per_breed * 2 // 3 else test).append(f"{name} {class_id} 1 {class_id}")
    header = ["#Image CLASS-ID SPECIES BREED ID", "#All images with 1st letter as captial are cat images"]
    for name, lines in (("trainval.txt", trainval), ("test.txt", test), ("list.txt", trainval + test)):
        (root / "annotations" / name).write_text("\n".join((header if comments else []) + lines) + "\n")
    return root


@pytest.fixture
def tiny_pets(tmp_path: Path) -> Path:
    return make_oxford(tmp_path / "pets", {"Abyssinian": 1, "american_bulldog": 2, "Bengal": 6})


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with every stage and a pre-trained classifier: synthetic 32 x 32 data, one epoch each."""
    from aepretrain.cli import main

    out = tmp_path_factory.mktemp("small-run") / "run"
    settings = ["--dataset", "synthetic", "--image-size", "32", "--quiet", "--precision", "32",
                "--set", "pretrain.epochs=1", "--set", "finetune.epochs=1", "--set", "pretrain.batch_size=16",
                "--set", "finetune.batch_size=16", "--set", "data.synthetic_per_class=16", "--set", "probe.enabled=false"]
    assert main(["pretrain", "--out", str(out), *settings]) == 0
    assert main(["finetune", "--init", "pretrained", "--out", str(out), *settings]) == 0
    return out


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run, shared read-only by the hostile-input tests (copy it before changing it)."""
    from aepretrain.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--out", str(out), *tiny("finetune.epochs=1", "probe.enabled=false")]) == 0
    return out
