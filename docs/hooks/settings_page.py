"""MkDocs hook: the page of every setting, generated at build time from the code, so it cannot drift from it.

``docs/settings.md`` holds the marker ``<!-- settings -->``; this hook replaces it with one table per section
of :class:`aepretrain.config.Config`. :func:`setting_rows` is the only function that reads the settings' code
(the dataclasses with their defaults and the comments beside them, ``RANGES``, ``CHOICES`` and the presets);
when those move into another form, it is the one function to change.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
from pathlib import Path
from typing import Any

import yaml

MARKER = "<!-- settings -->"
TYPE_WORDS = {"str": "text", "bool": "`true` or `false`"}  # what a setting without a range or choices takes


def on_config(config: Any) -> Any:
    # the checkout's own code, whatever aepretrain is installed: the page describes this version
    src = str(Path(config.config_file_path).parent / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render(setting_rows()))


def _field_comments(source: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> the comment at the end of the field's line."""
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    return {(cls.name, node.target.id): comments[node.lineno]
            for cls in ast.parse(source).body if isinstance(cls, ast.ClassDef)
            for node in cls.body if isinstance(node, ast.AnnAssign) and node.lineno in comments}


def setting_rows() -> list[dict[str, str]]:
    """Every setting of a run: section, dotted key, type, default, the presets that change it, what is allowed,
    and what it is (the comment beside the field in config.py)."""
    from aepretrain import config

    comments = _field_comments(Path(config.__file__).read_text())
    presets = {name: _flat(config.resolve(name)) for name in config.preset_names()}
    defaults = _flat(config.Config())

    def allowed(rule: str, kind: str) -> str:
        item = f"{rule}[]" in config.RANGES or f"{rule}[]" in config.CHOICES
        found = config.RANGES.get(rule) or config.RANGES.get(f"{rule}[]")
        choices = config.CHOICES.get(rule) or config.CHOICES.get(f"{rule}[]") or list(presets) * (rule == "preset")
        text = f"`{found}`" if found else "one of " + ", ".join(f"`{c}`" for c in choices) if choices else ""
        text = f"each item {text}" if item and text else text or TYPE_WORDS.get(kind.split(" | ")[0], "")
        return f"{text}, or `null`" if "None" in kind else text

    def row(section: str, key: str, owner: type, f: dataclasses.Field, meaning: str = "") -> dict[str, str]:
        default = defaults[key] if key in defaults else None if f.default is dataclasses.MISSING else f.default
        changed = [f"{name}: `{_value(values[key])}`" for name, values in presets.items()
                   if key in values and values[key] != defaults.get(key) and key != "preset"]
        return {"section": section, "key": key, "type": str(f.type), "presets": "<br>".join(changed),
                "default": "" if default is None and key not in defaults else _value(default),
                "allowed": allowed(key, str(f.type)),
                "meaning": comments.get((owner.__name__, f.name), meaning)}

    rows = []
    for top in dataclasses.fields(config.Config):
        section = getattr(config.Config(), top.name)
        if not dataclasses.is_dataclass(section):
            rows.append(row("top level", top.name, config.Config, top))
            continue
        for f in dataclasses.fields(section):
            key = f"{top.name}.{f.name}"
            if f.type != "list[BlockSpec]":
                rows.append(row(top.name, key, type(section), f))
                continue
            # a list of blocks: the block's own fields follow, as `model.blocks[].kernel`
            rows.append(row(top.name, key, type(section), f, f"a list of blocks. {config.BlockSpec.__doc__}"))
            rows += [row(top.name, f"{key}[].{sub.name}", config.BlockSpec, sub)
                     for sub in dataclasses.fields(config.BlockSpec)]
    return rows


def _flat(cfg: Any) -> dict[str, Any]:
    """Dotted key -> value, sections flattened; lists (model.blocks too) kept whole."""
    flat = {}
    for key, value in dataclasses.asdict(cfg).items():
        flat |= {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
    return flat


def _value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()


def render(rows: list[dict[str, str]]) -> str:
    """One Markdown table per section, under a heading of its own."""
    out = []
    for section in dict.fromkeys(r["section"] for r in rows):
        out += [f"## {section}", "", "| setting | type | default | presets that change it | allowed | what it is |",
                "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["section"] == section):
            cells = [f"`{r['key']}`", f"`{r['type']}`", f"`{r['default']}`" if r["default"] else "", r["presets"],
                     r["allowed"], r["meaning"]]
            out.append("| " + " | ".join(map(_cell, cells)) + " |")
        out.append("")
    return "\n".join(out)


def _cell(text: str) -> str:
    """A table cell: a pipe outside code would end the cell (inside code, Markdown's tables keep it)."""
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(text.split("`")))
