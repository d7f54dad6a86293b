"""Data: read a data set by name, decode it once into a store on disk, and split it into index arrays.

Example:
    >>> from aepretrain.config import resolve
    >>> bundle = prepare(resolve("tiny").data, seed=0)
    >>> sorted(bundle.counts())
    ['ae', 'ae_val', 'test', 'train', 'val']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..config import Config, DataConfig, closest
from ..errors import UserError
from ..seeds import derive_seed
from . import fashion_mnist, folder, oxford_pets, synthetic
from .base import UNLABELLED, DataBundle, Labelled, Source, match_channels
from .cache import progress_shown
from .splits import autoencoder_split, stratified_split, stratified_subset

READERS: dict[str, Callable[..., Source]] = {
    "fashion-mnist": fashion_mnist.read,
    "oxford-pets": oxford_pets.read,
    "folder": folder.read,
    "synthetic": synthetic.read,
}

__all__ = ["READERS", "DataBundle", "Labelled", "Source", "UNLABELLED", "match_channels", "prepare",
           "pretrain_images", "read_source"]


def read_source(cfg: DataConfig, seed: int, progress: bool = True) -> Source:
    """The data set's decoded pools; a store built on the way shows a progress bar on a terminal if ``progress``."""
    if cfg.dataset not in READERS:
        raise UserError(f"unknown data set '{cfg.dataset}'{closest(cfg.dataset, list(READERS))}; "
                        f"choose one of {', '.join(READERS)}")
    with progress_shown(progress):
        return READERS[cfg.dataset](root=cfg.root, size=cfg.image_size, cache_dir=cfg.cache_dir,
                                    max_pixels=cfg.max_pixels, seed=seed, classes=cfg.synthetic_classes,
                                    per_class=cfg.synthetic_per_class)


def prepare(cfg: DataConfig, seed: int, progress: bool = True) -> DataBundle:
    """Train / val / test / autoencoder splits, stratified and seeded.

    The official test split is kept where one exists; otherwise ``test_fraction`` is carved from
    the images. ``train_limit`` caps train + val before validation is carved from it. The
    autoencoder subset is ``ae_fraction`` of train + val, as the reference did; its validation
    images come from the rest of train + val.
    """
    source = read_source(cfg, seed, progress)
    pool, test = source.train, source.test
    notes = []
    if test is None:
        keep, take = stratified_split(pool.labels, cfg.test_fraction, derive_seed(seed, "test-carve"))
        pool, test = pool.take(keep), pool.take(take)
        notes.append(f"no official test split: {len(test)} images ({cfg.test_fraction:.0%}) carved from the data")
    if cfg.train_limit is not None and cfg.train_limit < len(pool):
        pool = pool.take(stratified_subset(pool.labels, cfg.train_limit, derive_seed(seed, "train-limit")))
        notes.append(f"train + val capped at {cfg.train_limit} images (stratified)")
    if cfg.test_limit is not None and cfg.test_limit < len(test):
        test = test.take(stratified_subset(test.labels, cfg.test_limit, derive_seed(seed, "test-limit")))
        notes.append(f"test capped at {cfg.test_limit} images (stratified)")
    keep, take = stratified_split(pool.labels, cfg.val_fraction, derive_seed(seed, "val-split"))
    train, val = pool.take(keep), pool.take(take)
    ae_index, ae_val_index = autoencoder_split(pool.labels, cfg.ae_fraction, cfg.val_fraction, seed)
    return DataBundle(dataset=cfg.dataset, root=source.root or cfg.root, classes=source.classes,
                      channels=source.channels, image_size=cfg.image_size, train=train, val=val, test=test,
                      ae=pool.take(ae_index), ae_val=pool.take(ae_val_index),
                      class_ids=source.class_ids, skipped=source.skipped, missing=source.missing, notes=notes)


def same_data(a: str, root_a: str | None, b: str, root_b: str | None) -> bool:
    """The same data set under any spelling of its root: a trailing slash, a relative path, a symbolic link."""
    if a != b:
        return False
    if root_a is None or root_b is None:
        return root_a == root_b
    first, second = Path(root_a), Path(root_b)
    return first.resolve() == second.resolve() or (first.exists() and second.exists() and first.samefile(second))


def pretrain_images(cfg: Config, bundle: DataBundle) -> tuple[Labelled, Labelled, str]:
    """The images the autoencoders train on, those their validation loss is taken on, and a sentence saying
    which they are.

    By default the autoencoder subset of the labelled data (``data.ae_fraction`` of train + val). With
    ``pretrain.dataset``, ``pretrain.fraction`` (default all) of a data set of its own, labelled or not; if that
    is the labelled data set, its train + val (validated as the autoencoder subset is); else validated on the
    labelled data's ``ae_val`` images. An image identical to one of the labelled test split (the same
    file under another path, or a copy) never enters pre-training unless ``pretrain.include_test``.
    """
    p = cfg.pretrain
    if p.dataset is None:
        images, val = bundle.ae, bundle.ae_val
        what = f"the autoencoder subset of {bundle.dataset}: {cfg.data.ae_fraction:.0%} of train + val"
    else:
        if same_data(p.dataset, p.root, cfg.data.dataset, cfg.data.root):
            pool = Labelled.concat([bundle.train, bundle.val])  # the labelled test split never enters this way
            where = f"train + val of {p.dataset}"
            take, held_out = autoencoder_split(pool.labels, p.fraction, cfg.data.val_fraction, cfg.seed)
            images, val = pool.take(take), pool.take(held_out)
        else:  # all of it (by default) is trained on; the validation loss is taken on the labelled data's images
            source = read_source(dataclasses.replace(cfg.data, dataset=p.dataset, root=p.root), cfg.seed,
                                 cfg.trainer.progress)
            pool = source.train if source.test is None else Labelled.concat([source.train, source.test])
            where = f"{p.dataset} at {p.root}"
            take = np.arange(len(pool)) if p.fraction >= 1 else stratified_split(pool.labels, p.fraction,
                                                                                   derive_seed(cfg.seed, "pretrain-fraction"))[1]
            images, val = pool.take(take), bundle.ae_val
        images.images = images.images.with_channels(bundle.channels)  # converted batch by batch, not here
        kind = "unlabelled" if (images.labels == UNLABELLED).all() else "labelled (labels unused)"
        what = f"{where} ({kind}): {p.fraction:.0%} of its {len(pool)} images"
        if not p.include_test:
            keep = ~np.isin(images.images.digests(), bundle.test.images.digests())
            if not keep.all():
                what += f"; {int((~keep).sum())} identical to labelled test images left out"
                images = images.take(np.flatnonzero(keep))
    if p.include_test:
        images = Labelled.concat([images, bundle.test])
        what += f", plus the {len(bundle.test)} labelled test images (asked for: pretrain.include_test)"
    else:
        what += "; no labelled test image"
    return images, val, what


def labels_required(bundle: DataBundle) -> None:
    """Refuse, before any training, data that fine-tuning and testing cannot use."""
    if not bundle.classes or (bundle.train.labels == UNLABELLED).any():
        raise UserError(f"{bundle.root} holds unlabelled images: fine-tuning needs one subfolder per class")
    if len(bundle.classes) < 2:
        raise UserError(f"{bundle.dataset} at {bundle.root} has one class ({bundle.classes[0]}): a classifier needs "
                        "at least two")
    for split in ("train", "val", "test"):
        if len(getattr(bundle, split)) == 0:
            raise UserError(f"the {split} split of {bundle.dataset} at {bundle.root} is empty ({bundle.counts()}): "
                            "fine-tuning and testing need images in train, val and test")
