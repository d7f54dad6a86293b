import dataclasses
import re
from pathlib import Path

import pytest

from aepretrain.config import preset_names, resolve
from aepretrain.errors import UserError


def test_presets_are_data() -> None:
    assert {"quick", "seed", "pets-sample"} <= set(preset_names())
    seed = resolve("seed")
    assert seed.data.image_size == 224 and seed.pretrain.epochs == 30 and seed.model.classifier_stride == 2


def test_overrides_in_order_file_then_set_then_flags(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("finetune:\n  epochs: 7\n  lr: 0.01\ndata:\n  dataset: synthetic\n")
    cfg = resolve("quick", file, ["finetune.epochs=3", "augment.brightness=[0.8, 1.2]"], seed=5)
    assert (cfg.finetune.epochs, cfg.finetune.lr, cfg.data.dataset, cfg.seed) == (3, 0.01, "synthetic", 5)
    assert cfg.augment.brightness == [0.8, 1.2]


@pytest.mark.parametrize("call, message", [
    (lambda: resolve("quik"), "unknown preset 'quik' (closest valid: quick)"),
    (lambda: resolve("quick", overrides=["finetune.epoch=3"]), "unknown setting 'finetune.epoch'"),
    (lambda: resolve("quick", overrides=["finetune.epochs=three"]), "must be a whole number"),
    (lambda: resolve("quick", overrides=["trainer.precision=fp8"]), "unknown precision 'fp8'"),
    (lambda: resolve("quick", overrides=["nonsense"]), "--set takes key=value"),
])
def test_bad_settings_name_the_key_and_the_closest(call, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_unknown_yaml_key_names_the_closest(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("pretrain:\n  epoch: 3\n")
    with pytest.raises(UserError, match=r"unknown setting 'pretrain.epoch' in .*c.yaml \(closest valid: pretrain.epochs\)"):
        resolve("quick", file)


def test_settings_saved_by_another_version_still_load_without_strictness() -> None:
    from aepretrain.config import from_dict

    saved = resolve("quick").to_dict()
    saved["trainer"]["compile"] = False  # a setting an older version had
    with pytest.raises(UserError, match="unknown setting 'trainer.compile'"):
        from_dict(saved)
    assert from_dict(saved, strict=False).model.blocks[0].channels == [16]


def _number_keys(section: object, prefix: str = "") -> list[str]:
    """Dotted keys of every int or float setting, list items as `key[]`, from the dataclasses' types."""
    from aepretrain.config import BlockSpec

    keys = []
    for f in dataclasses.fields(section):
        key, kind, value = f"{prefix}{f.name}", str(f.type), getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            keys += _number_keys(value, f"{key}.")
        elif kind == "list[BlockSpec]":
            keys += _number_keys(BlockSpec([1]), f"{key}[].")
        elif re.fullmatch(r"list\[(int|float)\]", kind):
            keys.append(f"{key}[]")
        elif re.match(r"(int|float)\b", kind):
            keys.append(key)
    return keys


def test_every_number_a_run_reads_has_a_range() -> None:
    from aepretrain.config import Config, schema

    ranged = {s.rule for s in schema() if s.range}
    assert set(_number_keys(Config())) - ranged == set()
    assert ranged - set(_number_keys(Config())) == set()
