"""What :mod:`masqd.config.parse` says about a text's syntax beyond the YAML and JSON loaders'
own words: a key given twice at the top level (kept, as upstream keeps it, but warned about with
both line numbers), a tab indenting YAML, a flow list or mapping left open. Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
import yaml.nodes

from masqd.errors import Problem

#: A top-level key given more than once: (its text, the 1-based line of each occurrence).
Duplicate = tuple[str, tuple[int, ...]]


def yaml_duplicates(node: Any) -> list[Duplicate]:
    """The keys given more than once in ``node`` when it is a mapping (the document's top level),
    each with the lines it is given on, in the order of their first occurrence."""
    if not isinstance(node, yaml.nodes.MappingNode):
        return []
    lines: dict[object, list[int]] = {}
    texts: dict[object, str] = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.nodes.ScalarNode):  # a key YAML compares by its text and tag
            ident = (key_node.tag, key_node.value)
            lines.setdefault(ident, []).append(key_node.start_mark.line + 1)
            texts[ident] = key_node.value
    return [(texts[ident], tuple(found)) for ident, found in lines.items() if len(found) > 1]


def json_duplicates(text: str) -> list[Duplicate]:
    """The keys of the top-level JSON object given more than once, with their lines. ``text`` is
    valid JSON whose top level is an object (read only after :func:`json.loads` found a repeat)."""
    decoder = json.JSONDecoder()
    lines: dict[str, list[int]] = {}
    position = _skip_space(text, text.index("{") + 1)
    while text[position] == '"':
        key, end = json.decoder.scanstring(text, position + 1)
        lines.setdefault(key, []).append(text.count("\n", 0, position) + 1)
        position = _skip_space(text, _skip_space(text, end) + 1)  # past the ':'
        _, position = decoder.raw_decode(text, position)
        position = _skip_space(text, position)
        if text[position] != ",":
            break
        position = _skip_space(text, position + 1)
    return [(key, tuple(found)) for key, found in lines.items() if len(found) > 1]


def _skip_space(text: str, position: int) -> int:
    while text[position] in " \t\r\n":
        position += 1
    return position


def has_repeat(pairs: list[tuple[str, Any]]) -> bool:
    """Whether a JSON object's ``pairs`` repeat a key (see :func:`json_duplicates`)."""
    return len({key for key, _ in pairs}) != len(pairs)


def duplicate_warnings(duplicates: list[Duplicate]) -> list[Problem]:
    """One warning per repeated key: where it is given, and that the last one is used."""
    warnings = []
    for key, lines in duplicates:
        listed = ", ".join(map(str, lines[:-1])) + f" and {lines[-1]}"
        times = "twice" if len(lines) == 2 else f"{len(lines)} times"
        warnings.append(Problem(key, None, f"given {times}, at lines {listed}: only the last (line {lines[-1]}) is "
                                           "used, as the upstream agent does; remove the others"))
    return warnings


def yaml_error_reason(exc: yaml.YAMLError, text: str) -> tuple[Any, str] | None:
    """``(mark, reason)`` in plain words for the YAML errors a hand-edited file most often has (a
    tab indenting a line, a ``[`` list or ``{`` mapping never closed), or ``None`` for others.
    ``mark`` is where to point: the tab, or the opening bracket."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or ""
    if mark is None:
        return None
    if "cannot start any token" in problem and _char_at(text, mark) == "\t":
        return mark, (f"a tab at line {mark.line + 1}, column {mark.column + 1}: tabs cannot indent YAML "
                      "(nor start a value); use spaces")
    opened = getattr(exc, "context_mark", None)
    context = getattr(exc, "context", None) or ""
    kind = "[ list" if "flow sequence" in context else "{ mapping" if "flow mapping" in context else None
    if kind is None or opened is None:
        return None
    closer = kind[0].replace("[", "]").replace("{", "}")
    where = f"a {kind} opened at line {opened.line + 1}, column {opened.column + 1}"
    if not _rest(text, mark).strip():
        return opened, f"{where} is never closed: add '{closer}' after its last item"
    return opened, (f"{where} is not closed: at line {mark.line + 1}, column {mark.column + 1} a ',' or "
                    f"'{closer}' was expected; close it with '{closer}' after its last item")


def _offset(text: str, mark: Any) -> int | None:
    lines = text.splitlines(keepends=True)
    if mark.line >= len(lines):
        return len(text) if mark.line == len(lines) else None
    return sum(map(len, lines[:mark.line])) + mark.column


def _char_at(text: str, mark: Any) -> str:
    offset = _offset(text, mark)
    return text[offset] if offset is not None and offset < len(text) else ""


def _rest(text: str, mark: Any) -> str:
    offset = _offset(text, mark)
    return "" if offset is None else text[offset:]


def error_location(text: str, mark: Any) -> tuple[str, str]:
    """``(<line L, column C>, the text around it)`` for a YAML error's mark (``<document>`` without)."""
    lines = text.splitlines()
    if mark is None:
        return "<document>", excerpt(lines[0] if lines else "", 0)
    line = lines[mark.line] if 0 <= mark.line < len(lines) else ""
    return f"<line {mark.line + 1}, column {mark.column + 1}>", excerpt(line, mark.column)


def excerpt(line: str, column: int) -> str:
    """``line`` when short, else the 80 characters around ``column`` (a minified JSON document is
    one line of megabytes: the error shows where, not all of it)."""
    if len(line) <= 80:
        return line
    start = max(0, min(column - 40, len(line) - 80))
    return ("..." if start > 0 else "") + line[start : start + 80] + ("..." if start + 80 < len(line) else "")
