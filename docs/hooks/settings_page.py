"""MkDocs hook: the page of every setting, generated at build time from the code, so it cannot drift from it.

``docs/settings.md`` holds the marker ``<!-- settings -->``; this hook replaces it with one table per section
of :class:`aepretrain.config.Config`, from the same schema that checks the settings and writes the command
line's help: :func:`aepretrain.config.schema` (each field's type, default, help, range and choices), and the
presets.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- settings -->"


def on_config(config: Any) -> Any:
    # the checkout's own code, whatever aepretrain is installed: the page describes this version
    src = str(Path(config.config_file_path).parent / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(setting_rows(), section_help()))


def setting_rows() -> list[dict[str, str]]:
    """Every setting of a run: section, dotted key, type, default, the presets that change it, what is allowed,
    and what it is; all but the presets from the schema (:func:`aepretrain.config.schema`)."""
    from aepretrain import config

    presets = {name: config.flatten(config.resolve(name).to_dict()) for name in config.preset_names()}
    defaults = config.flatten(config.Config().to_dict())

    rows = []
    for s in config.schema():
        section = s.key.split(".")[0] if "." in s.key else "top level"
        changed = [f"{name}: `{config.flow(values[s.key])}`" for name, values in presets.items()
                   if s.key in values and values[s.key] != defaults.get(s.key) and s.key != "preset"]
        rows.append({"section": section, "key": s.key, "type": config.type_name(s.kind),
                     "presets": "<br>".join(changed),
                     "default": "" if s.default is dataclasses.MISSING else config.flow(defaults.get(s.key, s.default)),
                     "allowed": config.allowed_text(s, lambda text: f"`{text}`"), "meaning": s.help})
    return rows


def section_help() -> dict[str, str]:
    """What each section of the settings is, from its field in :class:`aepretrain.config.Config`."""
    from aepretrain import config

    return {f.name: f.metadata["help"] for f in dataclasses.fields(config.Config)
            if dataclasses.is_dataclass(getattr(config.Config(), f.name))}


def render(rows: list[dict[str, str]], sections: dict[str, str]) -> str:
    """One Markdown table per section, under a heading of its own and what the section is."""
    out = []
    for section in dict.fromkeys(r["section"] for r in rows):
        said = [sections[section][0].upper() + sections[section][1:] + ".", ""] if section in sections else []
        out += [f"## {section}", "", *said,
                "| setting | type | default | presets that change it | allowed | what it is |", "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["section"] == section):
            cells = [f"`{r['key']}`", f"`{r['type']}`", f"`{r['default']}`" if r["default"] else "", r["presets"],
                     r["allowed"], r["meaning"]]
            out.append("| " + " | ".join(map(_cell, cells)) + " |")
        out.append("")
    return "\n".join(out)


def _cell(text: str) -> str:
    """A table cell: a pipe outside code would end the cell (inside code, Markdown's tables keep it)."""
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(text.split("`")))
