"""Named random streams: the streams older than the names keep their values; new names are hashed apart."""

from __future__ import annotations

import numpy as np

from aepretrain.seeds import KEPT, derive_seed, numpy_generator


def test_kept_streams_give_the_values_the_published_numbers_came_from() -> None:
    for seed in (0, 7, 123456):
        assert [derive_seed(seed, n) for n in ("model-init", "train-limit", "val-split", "ae-subset",
                                               "random-encoder")] == [seed, seed, seed + 1, seed + 2, seed + 99]
        for index in (0, 3):
            mixed = (seed * 1_000_003 + index * 7919) % 2**63
            assert [derive_seed(seed, n, index) for n in ("epoch-order", "epoch-draws", "decoder-init")] == \
                [mixed, mixed + 1, mixed + 2]
        assert np.array_equal(numpy_generator(seed, "label-fractions").permutation(20),
                              np.random.default_rng([seed, 17]).permutation(20))
        assert np.array_equal(numpy_generator(seed, "synthetic", 1).random(3), np.random.default_rng([seed, 1]).random(3))


def test_new_names_are_hashed_apart_and_stay_in_range() -> None:
    seeds = {derive_seed(s, name, *parts) for s in (0, 1) for name, parts in
             (("loader", ()), ("ae-val", ()), ("pretrain-fraction", ()), ("loader", (1,)))}
    assert len(seeds) == 8 and all(0 <= v < 2**63 for v in seeds)
    assert not {"loader", "ae-val", "pretrain-fraction"} & set(KEPT)
    assert derive_seed(5, "loader") == derive_seed(5, "loader")  # the same on every call and machine
