"""One schema of the settings: every dataclass field carries its help, range and choices, and validation, the
command line's help, `aepretrain config show` and `aepretrain config keys` all read it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from aepretrain import config
from aepretrain.cli import COMMAND_FLAGS, FLAG_SETTINGS, build_parser, main
from aepretrain.reference import REFERENCE

from .test_hostile import one_line_error


def settings_classes(cls: type = config.Config) -> list[type]:
    """Every dataclass of the settings, found from Config by the fields' types (a list's item type too)."""
    found = [cls]
    for kind in typing.get_type_hints(cls).values():
        for inner in (kind, *typing.get_args(kind)):
            if dataclasses.is_dataclass(inner) and inner not in found:
                found += [c for c in settings_classes(inner) if c not in found]
    return found


def walked_keys(cls: type = config.Config, prefix: str = "") -> list[str]:
    """Every setting's dotted key, from the dataclasses alone; a list of blocks' fields as model.blocks[].NAME."""
    keys = []
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            keys += walked_keys(kind, f"{prefix}{f.name}.")
            continue
        keys.append(prefix + f.name)
        item = (typing.get_args(kind) or [None])[0]
        if dataclasses.is_dataclass(item):
            keys += walked_keys(item, f"{prefix}{f.name}[].")
    return keys


def subparsers(parser: argparse.ArgumentParser, name: str = "aepretrain") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its words (`config show` too)."""
    found = {name: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word, sub in action.choices.items():
                found |= subparsers(sub, f"{name} {word}")
    return found


def test_every_field_of_every_settings_dataclass_has_help() -> None:
    classes = settings_classes()
    assert {config.Config, config.BlockSpec, config.ModelConfig, config.StudyConfig} <= set(classes)
    lacking = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if not str(f.metadata.get("help", "")).strip()]
    assert lacking == []


def test_every_choice_and_default_is_in_the_help_of_its_flag(capsys: pytest.CaptureFixture[str]) -> None:
    settings = {s.key: s for s in config.schema()}
    quick = config.resolve("quick")
    checked = set()
    for command, parser in subparsers(build_parser()).items():
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help and action.help.strip(), f"{command} {action.option_strings[-1]} has no help"
            key = FLAG_SETTINGS.get(action.dest) if command.removeprefix("aepretrain ") in COMMAND_FLAGS else None
            if key is None:  # download --root is no setting
                continue
            setting = settings[key]
            assert action.help.startswith(setting.help.replace("%", "%%")), (command, action.dest)
            for choice in config.choices_of(setting):
                assert choice in action.help.replace(",", " ").split(), (command, action.dest, choice)
            value = quick
            for part in key.split("."):
                value = getattr(value, part)
            if not isinstance(value, (list, bool, type(None))):
                assert action.help.endswith(f"(default: {value})"), (command, action.dest)
            checked.add(key)
    assert {"trainer.device", "trainer.precision", "pretrain.objective", "study.objectives", "trainer.loggers",
            "study.engine", "preset", "data.image_size"} <= checked
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps the help
    assert "one of auto, cpu, cuda, gpu, mps (default: auto)" in shown
    assert "--image-size IMAGE_SIZE side of the square the images are resized to; in [8, 1024] (default: 32)" in shown


def test_every_positional_argument_has_help() -> None:
    for command, parser in subparsers(build_parser()).items():
        for action in parser._actions:
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{command} {action.dest} has no help"


def test_config_show_of_a_preset_read_back_by_config_is_that_preset(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--preset", "seed"]) == 0
    file = tmp_path / "s.yaml"
    file.write_text(capsys.readouterr().out)
    read_back, seed = config.resolve("quick", config_file=file).to_dict(), config.resolve("seed").to_dict()
    assert read_back.pop("preset") == "quick" and seed.pop("preset") == "seed"  # the preset is --preset's, not a file's
    assert read_back == seed
    # the seed network itself: the reference's parameter counts, from the file under the default preset
    assert main(["summary", "--config", str(file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classifier"]["total"] == REFERENCE["classifier_total"] == 1_128_997
    # and a run takes it with its flags on top
    assert main(["config", "show", "--config", str(file), "--set", "finetune.epochs=3"]) == 0
    shown = config.from_dict(config._load_yaml(capsys.readouterr().out, "shown"))
    assert shown.finetune.epochs == 3 and shown.model == config.resolve("seed").model


def test_config_commands_load_neither_torch_nor_lightning(tmp_path: Path) -> None:
    probe = ("import sys; from aepretrain.cli import main; code = main(['config', sys.argv[1]]); "
             "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'pytorch_lightning'}); "
             "print(code, loaded, file=sys.stderr)")
    for action in ("show", "keys"):
        done = subprocess.run([sys.executable, "-c", probe, action], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path)
        assert done.returncode == 0 and done.stderr.splitlines()[-1] == "0 []", done.stderr[-2000:]
        assert done.stdout


def test_config_keys_lists_every_setting_once_with_its_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "keys"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert lines[0].split() == ["key", "type", "quick", "allowed", "help"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert len(rows) == len(lines) - 1
    assert list(rows) == walked_keys()
    assert {"model.blocks[].kernel", "trainer.device", "study.task_gpus"} <= set(rows)
    assert rows["trainer.device"].split()[1:3] == ["str", "auto"]
    assert "one of auto, cpu, cuda, gpu, mps" in rows["trainer.device"]
    assert rows["model.dropout"].split()[1:3] == ["float", str(config.resolve("quick").model.dropout)]
    assert " [0, 1) " in rows["model.dropout"]
    assert main(["config", "keys", "--preset", "seed"]) == 0
    seed_rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[3:]}
    assert seed_rows["model.dropout"].split()[2] == "0.5"


def test_a_range_from_a_field_s_metadata_is_enforced_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    dropout = next(f for f in dataclasses.fields(config.ModelConfig) if f.name == "dropout")
    assert dropout.metadata["range"] == "[0, 1)"
    assert main(["config", "show", "--set", "model.dropout=1.5"]) == 2
    assert one_line_error(capsys, "model.dropout must lie in [0, 1), got 1.5") == \
        "aepretrain: error: model.dropout must lie in [0, 1), got 1.5\n"
    assert main(["config", "show", "--set", "trainer.device=gpux"]) == 2
    one_line_error(capsys, "unknown device 'gpux' for trainer.device (closest valid: gpu); choose one of auto, cpu, "
                   "cuda, gpu, mps")


def test_the_choice_tuples_are_the_literals() -> None:
    assert config.DEVICES == typing.get_args(config.Device) and "gpu" in config.DEVICES
    assert config.OBJECTIVES == next(s.choices for s in config.schema() if s.key == "study.objectives")
