"""The documentation site builds with `mkdocs build --strict` (every link, anchor and API page), and its settings
page, generated from the code at build time, lists exactly the settings of aepretrain.config."""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aepretrain import config

ROOT = Path(__file__).resolve().parents[1]
MISSING = [name for name in ("mkdocs", "material", "mkdocstrings_handlers.python")
           if importlib.util.find_spec(name.split(".")[0]) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the docs extra is not installed ({', '.join(MISSING)} "
                                "missing): pip install -e '.[docs]'")


def dotted_keys() -> set[str]:
    """Every setting of a run by its dotted key, read from the dataclasses; a block's fields as model.blocks[].NAME."""
    keys = set()
    for top in dataclasses.fields(config.Config):
        section = getattr(config.Config(), top.name)
        if not dataclasses.is_dataclass(section):
            keys.add(top.name)
            continue
        for f in dataclasses.fields(section):
            keys.add(f"{top.name}.{f.name}")
            if f.type == "list[BlockSpec]":
                keys |= {f"{top.name}.{f.name}[].{sub.name}" for sub in dataclasses.fields(config.BlockSpec)}
    return keys


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    # from another folder than the checkout's, as CI or a user may run it
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=out.parent, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def settings_rows(site: Path) -> dict[str, list[str]]:
    """The settings page's table rows: dotted key -> the text of the other cells."""
    page = (site / "settings.html").read_text()
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", page, re.S):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", re.sub(r"<br\s*/?>", "\n", c))).strip()
                 for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
        if len(cells) == 6:  # the generated tables: setting, type, default, presets, allowed, what it is
            rows[cells[0]] = cells[1:]
    return rows


def test_the_settings_page_lists_every_setting_and_no_other(site: Path) -> None:
    rows = settings_rows(site)
    assert set(rows) == dotted_keys()
    assert {"seed", "model.blocks[].kernel", "data.max_pixels", "study.task_gpus"} <= set(rows)


def test_the_settings_page_shows_defaults_presets_and_ranges_from_the_code(site: Path) -> None:
    rows = settings_rows(site)
    default, quick = config.Config().finetune.epochs, config.resolve("quick").finetune.epochs
    _, shown_default, presets, allowed, _ = rows["finetune.epochs"]
    assert shown_default == str(default)
    assert f"quick: {quick}" in presets.split("\n")
    assert allowed == next(s.range for s in config.schema() if s.key == "finetune.epochs")
    assert rows["trainer.precision"][3] == "one of " + ", ".join(config.PRECISIONS)
    assert rows["data.max_pixels"][4] == "larger images are refused as possible decompression bombs"


def test_every_page_is_built_and_fetches_nothing_from_outside(site: Path) -> None:
    pages = {p.name for p in site.glob("*.html")}
    assert {"index.html", "getting-started.html", "own-folder.html", "report.html", "study.html",
            "export-serve.html", "settings.html", "scaling.html", "reliability.html", "api.html"} <= pages
    for page in pages:
        text = (site / page).read_text()
        # only links may point outside (the theme's credit); no stylesheet, script, font or image does
        assert not re.findall(r"<(?:link|script|img)[^>]*(?:href|src)=\"https?://", text), page
    api = (site / "api.html").read_text()
    assert 'id="aepretrain.pipeline.run"' in api and 'id="aepretrain.export.load_encoder"' in api
