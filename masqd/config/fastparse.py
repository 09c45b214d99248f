"""A fast path for the YAML shape a big config has: the ``nonMasqueradeCIDRs`` list in block style,
one CIDR per line. Pure: no I/O.

A YAML loader builds an event, a node and an object per list item; at 100k items that is most of
a second. :func:`fast_document` finds the list's lines with regular expressions and takes each
item's text as it is, and leaves the rest of the file to the full loader, which then reads a
document of a few lines. It returns exactly the document the full loader returns for the text,
or ``None`` whenever it is not sure; the caller then loads the whole text as before, so every
error (with its line and column) comes from the full loader. It takes only a text

- of printable ASCII and newlines (no tab, no carriage return, no byte order mark);
- with one line ``nonMasqueradeCIDRs:`` starting at column 0 with nothing after the colon but
  spaces and a comment, and no ``[`` or ``{`` before it (so it is not inside a flow collection);
- after which come only lines that are blank, a comment, or an item ``- VALUE`` at one
  indentation, where VALUE is a plain scalar of hex digits, ``.`` and ``:``, then ``/`` and
  digits (YAML reads any such scalar as that string: no implicit type has a ``/``), or the same
  characters quoted, then optionally spaces and a comment; at least one item;
- and then the end of the text, or a line starting at column 0 with anything but ``-``.

The text with that list replaced by a placeholder on the key's line must load (by the full
loader) into a mapping whose ``nonMasqueradeCIDRs`` is the placeholder. As the text before the
key's line is the same in both, the key's line starts a key of the top-level block mapping in
both; its value is the list in one and the placeholder in the other; after it, both continue
that mapping with the same text. ``tests/test_config_fastparse.py`` checks the two agree on a
corpus of odd documents.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from itertools import repeat
from typing import Any

_KEY = "nonMasqueradeCIDRs"
#: What stands in for the list while the rest of the text is loaded: a plain scalar YAML reads
#: as this string, absent from any text the fast path takes.
_PLACEHOLDER = "masqd-fast-path-list-placeholder"

#: Printable ASCII and the newline: the only characters of a text the fast path takes.
_SAFE_BYTES = bytes(range(0x20, 0x7F)) + b"\n"
_KEY_LINE = re.compile(rf"{_KEY}:(?:[ ]+(?:#[^\n]*)?)?\n")
_FLOW_START = re.compile(r"[\[{]")
_SKIPPED = re.compile(r"(?:[ ]*(?:#[^\n]*)?\n)*")  # blank and comment lines
_FIRST_ITEM = re.compile(r"([ ]*)-[ ]")
# One item's value: a plain scalar that holds a "/" (no YAML resolver takes one: it is a
# string), or the same characters quoted (no escapes, no line breaks).
_PLAIN = r"[0-9A-Fa-f:.]+/[0-9]+"
_QUOTED = r"\"[0-9A-Fa-f:./]*\"|'[0-9A-Fa-f:./]*'"
_MAX_INDENT = 32  # the list patterns are compiled (and kept) per indentation
_LIST_PATTERNS: dict[int, tuple[re.Pattern[str], re.Pattern[str]]] = {}


def fast_document(text: str, load: Callable[[str], Any]) -> dict | None:
    """The document ``load(text)`` returns, when ``text`` has the shape described in the module
    docstring; otherwise ``None``. ``load`` is the full YAML loader: it is given the text without
    the list (and whatever it raises means ``None``)."""
    if not text.isascii() or text.encode().translate(None, _SAFE_BYTES) or _PLACEHOLDER in text:
        return None
    padded = text if text.endswith("\n") else text + "\n"  # every line of the list ends in a newline
    key_lines = [match for match in map(_KEY_LINE.match, repeat(padded), _line_starts(padded, _KEY)) if match]
    if len(key_lines) != 1:
        return None
    key_line = key_lines[0]
    if _FLOW_START.search(text, 0, key_line.start()):
        return None  # the key's line might be inside a flow collection, where "- " is an error
    first = _FIRST_ITEM.match(padded, _SKIPPED.match(padded, key_line.end()).end())
    if first is None:
        return None
    indent = len(first.group(1))
    if indent > _MAX_INDENT:
        return None
    simple, general = _list_patterns(indent)
    simple_end = simple.match(padded, key_line.end()).end()
    end = general.match(padded, simple_end).end()
    if end < len(text) and text[end] in " -":
        return None  # the list goes on in a shape not taken here, or something else is nested in it
    if end == simple_end:  # lines "- VALUE" alone: the values are what lies between the markers
        marker = "\n" + " " * indent + "- "
        items = padded[key_line.end() - 1:end - 1].split(marker)[1:]
    else:
        items = _items(padded[key_line.end():end], indent)
    if not items:
        return None
    try:
        document = load(f"{text[:key_line.start()]}{_KEY}: {_PLACEHOLDER}\n{text[end:]}")
    except Exception:  # noqa: BLE001 - any failure: the full loader reads the whole text and says what
        return None
    if not isinstance(document, dict) or type(document.get(_KEY)) is not str or document[_KEY] != _PLACEHOLDER:
        return None
    document[_KEY] = items
    return document


def _line_starts(text: str, prefix: str) -> Iterator[int]:
    """Where the lines starting with ``prefix`` start (``str.find`` is far faster than ``^``)."""
    if text.startswith(prefix):
        yield 0
    needle = "\n" + prefix
    found = text.find(needle)
    while found >= 0:
        yield found + 1
        found = text.find(needle, found + 1)


def _list_patterns(indent: int) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The lines of a list at ``indent``, each ending in a newline: (the common lines alone,
    ``- VALUE`` with one space and an unquoted value, which match several times faster; every
    line taken: blank, a comment, or an item with its value plain or quoted, then spaces and a
    comment)."""
    patterns = _LIST_PATTERNS.get(indent)
    if patterns is None:
        simple = rf"(?:[ ]{{{indent}}}-[ ]{_PLAIN}\n)*"
        item = rf"[ ]{{{indent}}}-[ ]+(?:{_PLAIN}|{_QUOTED})(?:[ ]+#[^\n]*|[ ]*)\n"
        patterns = _LIST_PATTERNS[indent] = (re.compile(simple), re.compile(rf"(?:{item}|[ ]*(?:#[^\n]*)?\n)*"))
    return patterns


def _items(region: str, indent: int) -> list[str]:
    """Each item's string, in order (``region`` holds only lines the list patterns took)."""
    if '"' not in region and "'" not in region:
        return re.findall(rf"^[ ]{{{indent}}}-[ ]+([^ \n]+)", region, re.MULTILINE)
    found = re.findall(rf"^[ ]{{{indent}}}-[ ]+(?:\"([^\"\n]*)\"|'([^'\n]*)'|([^ \n]+))", region, re.MULTILINE)
    return [double or single or plain for double, single, plain in found]
