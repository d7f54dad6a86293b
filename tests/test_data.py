import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aepretrain.cli import main
from aepretrain.config import AugmentConfig, resolve
from aepretrain.data import prepare
from aepretrain.data.images import decode
from aepretrain.data.splits import stratified_split
from aepretrain.transforms import augmenter

from .conftest import make_oxford, photo


def data_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["data", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_pets_sample_counts_classes_and_quirks(pets_sample: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    info = data_json(capsys, "--dataset", "oxford-pets", "--root", str(pets_sample), "--out", str(tmp_path),
                     "--image-size", "64")
    assert info["classes"] == ["Abyssinian", "american_bulldog", "Bengal"]
    assert info["class_ids"] == [1, 2, 6]
    assert info["counts"]["train"] + info["counts"]["val"] == 300 and info["counts"]["test"] == 298
    assert info["skipped"] == [] and info["missing"] == []
    assert info["image_size"] == [64, 64, 3]
    assert sum(row["test"] for row in info["per_class"].values()) == 298
    assert Path(info["sample_grid"]).is_file()
    bundle = prepare(resolve("seed", **{"data.root": str(pets_sample), "data.image_size": 64}).data, 0)
    alpha_png = bundle.test.images[bundle.test.names.index("Abyssinian_5")]  # a PNG with alpha, named .jpg
    assert alpha_png.shape == (64, 64, 3) and alpha_png.std() > 10
    gif, reason = decode(pets_sample / "images" / "Abyssinian_34.jpg", 32)  # a GIF named .jpg, not listed
    assert reason is None and gif.shape == (32, 32, 3)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "1", "LA"])
@pytest.mark.parametrize("fmt", ["PNG", "GIF", "JPEG", "WEBP", "BMP"])
def test_any_format_and_mode_decodes_to_rgb_by_content(tmp_path: Path, mode: str, fmt: str) -> None:
    img = photo(1, mode=mode)
    path = tmp_path / "named-wrongly.jpg"
    try:
        img.save(path, fmt)
    except (OSError, ValueError, KeyError):
        pytest.skip(f"Pillow cannot write {mode} as {fmt}")
    pixels, reason = decode(path, 16)
    assert reason is None and pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8


def test_oxford_layout_with_comment_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_oxford(tmp_path / "pets", {"Bombay": 7, "pug": 25}, comments=True)
    (root / "images" / "Bombay_1.mat").write_bytes(b"MATLAB 5.0 MAT-file")
    info = data_json(capsys, "--dataset", "oxford-pets", "--root", str(root), "--out", str(tmp_path))
    assert info["classes"] == ["Bombay", "pug"] and info["class_ids"] == [7, 25]
    assert info["counts"]["train"] + info["counts"]["val"] == 8 and info["counts"]["test"] == 4
    assert info["skipped"] == []  # the unlisted .mat file is ignored, not reported


def test_damaged_files_are_skipped_with_reasons_and_the_rest_used(tiny_pets: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    images = tiny_pets / "images"
    good = (images / "Bengal_1.jpg").read_bytes()
    (images / "Bengal_1.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    (images / "Bengal_2.jpg").write_bytes(b"")  # zero bytes
    (images / "Bengal_3.jpg").write_text("not an image at all")
    Image.new("1", (12000, 12000)).save(images / "Bengal_4.jpg", "PNG")  # 144 Mpixel bomb, a few kB
    (images / "Abyssinian_1.jpg").unlink()  # listed, missing
    info = data_json(capsys, "--dataset", "oxford-pets", "--root", str(tiny_pets), "--out", str(tmp_path))
    reasons = {Path(s["path"]).name: s["reason"] for s in info["skipped"]}
    assert set(reasons) == {"Bengal_1.jpg", "Bengal_2.jpg", "Bengal_3.jpg", "Bengal_4.jpg"}
    assert "truncated" in reasons["Bengal_1.jpg"]
    assert "empty" in reasons["Bengal_2.jpg"]
    assert "not an image" in reasons["Bengal_3.jpg"]
    assert "decompression bomb" in reasons["Bengal_4.jpg"]
    assert [Path(p).name for p in info["missing"]] == ["Abyssinian_1.jpg"]
    assert sum(info["counts"][k] for k in ("train", "val", "test")) == 18 - 5


@pytest.mark.parametrize("args, message", [
    (["--dataset", "oxford-pets", "--root", "/nonexistent/pets"], "data root not found: /nonexistent/pets"),
    (["--dataset", "oxford-pest"], "unknown data set 'oxford-pest' (closest valid: oxford-pets)"),
    (["--dataset", "folder", "--root", "/nonexistent"], "data root not found"),
])
def test_bad_data_arguments_get_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_root_without_annotations_says_what_was_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert main(["data", "--dataset", "oxford-pets", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "expected images/ and annotations/" in err and "found images/, notes.txt" in err


def test_listed_files_all_missing_fails_clearly(tiny_pets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(tiny_pets / "images")
    (tiny_pets / "images").mkdir()
    assert main(["data", "--dataset", "oxford-pets", "--root", str(tiny_pets)]) == 2
    assert "no usable image" in capsys.readouterr().err


def test_folder_labelled_and_unlabelled(tmp_path: Path) -> None:
    for k, cls in enumerate(["cats", "dogs"]):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(10):
            photo(k * 10 + i).save(tmp_path / "lab" / cls / f"{i}.png")
    (tmp_path / "unl").mkdir()
    for i in range(6):
        photo(i).save(tmp_path / "unl" / f"{i}.jpg")
    (tmp_path / "unl" / "README").write_text("hello")
    cfg = resolve("quick", **{"data.dataset": "folder", "data.root": str(tmp_path / "lab"), "data.image_size": 16})
    bundle = prepare(cfg.data, 0)
    assert bundle.classes == ["cats", "dogs"] and bundle.channels == 3
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 20
    assert np.bincount(bundle.test.labels).tolist() == [2, 2]  # stratified 20 %
    cfg.data.root = str(tmp_path / "unl")
    bundle = prepare(cfg.data, 0)
    assert bundle.classes == [] and (bundle.train.labels == -1).all()
    assert [Path(s["path"]).name for s in bundle.skipped] == ["README"]


def test_synthetic_is_deterministic_from_the_seed() -> None:
    cfg = resolve("quick", **{"data.dataset": "synthetic", "data.image_size": 16})
    a, b, c = prepare(cfg.data, 3), prepare(cfg.data, 3), prepare(cfg.data, 4)
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, c.train.images)


def test_fashion_mnist_reads_idx_files(fashion_root: Path) -> None:
    cfg = resolve("quick", overrides=["data.train_limit=null"], **{"data.root": str(fashion_root)})
    bundle = prepare(cfg.data, 0)
    assert len(bundle.train) + len(bundle.val) == 60_000 and len(bundle.test) == 10_000
    assert bundle.train.images.shape[1:] == (32, 32, 1) and bundle.classes[0] == "T-shirt/top"
    assert len(bundle.ae) == 20_000


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "--root", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tiny_pets: Path) -> None:
    cfg = resolve("seed", **{"data.root": str(tiny_pets), "data.image_size": 48})
    prepare(cfg.data, 0)
    from aepretrain.data.cache import cache_root

    files = sorted(cache_root(None).glob("oxford-pets-*-48-*.npy"))
    assert len(files) == 2
    prepare(cfg.data, 0)
    assert sorted(cache_root(None).glob("oxford-pets-*-48-*.npy")) == files
    photo(999).save(tiny_pets / "images" / "Bengal_1.jpg", "JPEG")
    prepare(cfg.data, 0)
    assert len(sorted(cache_root(None).glob("oxford-pets-*-48-*.npy"))) == 3


def test_splits_are_stratified_seeded_and_disjoint() -> None:
    labels = np.repeat(np.arange(3), [30, 60, 90])
    keep, take = stratified_split(labels, 0.2, seed=1)
    assert np.bincount(labels[take]).tolist() == [6, 12, 18]
    assert set(keep).isdisjoint(take) and len(keep) + len(take) == 180
    assert np.array_equal(take, stratified_split(labels, 0.2, seed=1)[1])
    assert not np.array_equal(take, stratified_split(labels, 0.2, seed=2)[1])


def test_autoencoder_subset_is_a_third_of_train_and_val(tiny_pets: Path) -> None:
    bundle = prepare(resolve("seed", **{"data.root": str(tiny_pets), "data.image_size": 16}).data, 0)
    pool = len(bundle.train) + len(bundle.val)
    assert len(bundle.ae) == pytest.approx(pool / 3, abs=len(bundle.classes))
    assert set(bundle.ae.names) <= set(bundle.train.names + bundle.val.names)
    # the autoencoders train on all of the third and validate outside it (the reference trained on the third)
    assert bundle.ae_val.names and not set(bundle.ae_val.names) & set(bundle.ae.names)
    assert set(bundle.ae_val.names) <= set(bundle.train.names + bundle.val.names)
    assert len(bundle.ae_val) == pytest.approx(0.2 * len(bundle.ae), abs=len(bundle.classes))  # seed: val_fraction 0.2


def test_the_autoencoders_train_on_the_whole_subset(tmp_path: Path) -> None:
    from aepretrain.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--dataset", "synthetic", "--image-size", "16", "--quiet",
                 "--precision", "32", "--set", "pretrain.epochs=1", "--set", "probe.enabled=false"]) == 0
    bundle = prepare(resolve("quick", **{"data.dataset": "synthetic", "data.image_size": 16}).data, 0)
    metrics = json.loads((out / "metrics.json").read_text())["pretrain"]
    assert metrics["images"] == len(bundle.ae) and metrics["val_images"] == len(bundle.ae_val)
    from aepretrain.data.loading import batches_per_epoch

    seen = batches_per_epoch(len(bundle.ae), 128, drop_last=True) * min(128, len(bundle.ae))
    assert metrics["stages"][0]["history"][0]["samples"] == seen


def test_augmentation_is_batched_and_bounded() -> None:
    torch.manual_seed(0)
    x = torch.full((64, 3, 16, 16), 0.5)
    y = augmenter(AugmentConfig(rotation=0, zoom=0, brightness=[0.7, 1.3], hflip=False))(x)
    factors = y.mean(dim=(1, 2, 3)) / 0.5
    assert y.shape == x.shape and factors.min() >= 0.7 - 1e-4 and factors.max() <= 1.3 + 1e-4
    assert factors.std() > 0.05  # one factor per image, not per batch
    ramp = torch.arange(16.0).expand(1, 1, 16, 16).repeat(32, 1, 1, 1)
    flipped = augmenter(AugmentConfig(rotation=0, zoom=0, brightness=[1.0, 1.0], hflip=True))(ramp)
    n_flipped = int((flipped[:, 0, 0, 0] == 15).sum())
    assert 4 < n_flipped < 28  # about half the batch is flipped


def test_prediction_decodes_a_large_photo_exactly_as_training(tmp_path: Path) -> None:
    """Training decodes JPEGs at reduced scale (draft) before resizing; predict must do the same."""
    from PIL import Image

    from aepretrain.prediction import prepare_image

    root = tmp_path / "photos"
    yy, xx = np.mgrid[0:900, 0:1200]
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            rng = np.random.default_rng(i + 10 * (c == "dogs"))
            base = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, (xx + yy) % 256], -1).astype(np.float32)
            pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{c}{i}.jpg", quality=90)
    bundle = prepare(resolve("quick", **{"data.dataset": "folder", "data.root": str(root),
                                         "data.image_size": 64}).data, 0)
    seen = {n: img for split in (bundle.train, bundle.val, bundle.test) for n, img in zip(split.names, split.images)}
    assert len(seen) == 6
    for name, trained_on in seen.items():
        path = next(root.rglob(Path(name).name))
        predicted_on = prepare_image(path, 64, 3)
        assert predicted_on.shape == trained_on.shape == (64, 64, 3)
        assert np.array_equal(predicted_on, trained_on), f"{name}: max difference " \
            f"{np.abs(predicted_on.astype(int) - trained_on.astype(int)).max()}"
