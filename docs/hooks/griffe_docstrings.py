"""Griffe extension for the API pages: reads the project's docstrings as the Google style mkdocstrings expects.

The docstrings head their doctests ``Example:``, which the Google parser takes for an admonition of free Markdown
(so ``>>> ... [1, 2]`` becomes a broken link); ``Examples:`` makes them code. A doctest in the text itself
(``>>>`` at the start of a line, no heading) is fenced as code, not read as a quote. Sphinx roles
(``:func:`name```) are shown as the code they name. The source stays as it is: its doctests run as tests.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
DOCTEST_FLAG = re.compile(r"\s*#\s*doctest:.*$")  # for the test runner, not the reader
SPHINX_ROLE = re.compile(r":(?:func|class|data|meth|mod|attr):`~?([^`]+)`")


def fence_doctests(text: str) -> str:
    """Each doctest block that starts a line (it ends at a blank line, as doctest reads it) as a code block."""
    out, inside = [], False
    for line in text.split("\n"):
        if not inside and line.startswith(">>>"):
            out.append("```pycon")
            inside = True
        elif inside and not line.strip():
            out.append("```")
            inside = False
        out.append(DOCTEST_FLAG.sub("", line) if inside else line)
    return "\n".join(out + ["```"] * inside)


class DocstringsAsGoogle(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = fence_doctests(SPHINX_ROLE.sub(r"`\1`", text))
