"""The fast path of config parsing (``masqd.config.fastparse``) against the full YAML loader.

For every document of a corpus of odd YAML (comments, quotes, tags, anchors, tabs, CRLF, a byte
order mark, flow collections, duplicate keys, nested and continued items, several documents,
``-`` variants, trailing spaces, no final newline) and for generated ones, the fast path either
declines or gives exactly the document the full loader gives; and ``parse_config`` ends the same
(config, warnings, or the error with every problem and its line) with the fast path as without.
The common shapes of a big config must actually take the fast path.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from masqd.config import AgentOptions, parse_config
from masqd.config import parse as parse_module
from masqd.config.fastparse import fast_document
from masqd.config.parse import _load_yaml
from masqd.errors import ConfigError

from config_strategies import HANG_SECONDS, documents

V4 = AgentOptions()
V6 = AgentOptions(enable_ipv6=True)

#: What may come before the list's key line.
PREFIXES = (
    "", "cidrLimit: 100\n", "# header\n\n", "---\n", "--- # doc\n", "%YAML 1.1\n---\n", "--- !!map\n", "--- !!set\n",
    "--- !!omap\n", "masqLinkLocal: true\nmasqLinkLocalIPv6: false\n", "foo: [a]\n", "foo: {a: 1}\n", "# see [docs]\n",
    'foo: "multi\n', "foo: 'multi\n", "foo: |\n  text\n", "foo: >\n  text\n", "? complex\n", "? complex\n: value\n",
    "nonmasqueradecidrs: [1.2.3.4/32]\n", "nonMasqueradeCIDRs: [1.2.3.4/32]\n", "nonMasqueradeCIDRs: 3\n",
    "&a x: 1\n", "x: &a 1\n", "resyncInterval: 2024-01-01\n", "\ufeff", "\ufeffcidrLimit: 5\n", "cidrLimit: 5\r\n",
    "\tcidrLimit: 5\n", "foo:\n  bar: 1\n", "foo:\n  - 1\n", "foo:\n- 1\n", "- a\n", "a\n", "{\n", "[\n", "{a: 1,\n",
    "[1,\n", "foo: bar\n  continued\n", "!!map\n", "--- |\n", "--- >\n", "'\n", '"\n', "#", "cidrLimit: 100  # c\n",
    "...\n", "...\n---\n", "x: masqd-fast-path-list-placeholder\n", "<<: {cidrLimit: 3}\n", "cidrLimit: 5 \n",
    "Büro: 1\n", "cidrLimit: 5\x85", "x: \x07\n", "x: 'a\n\n  b'\n",
)
#: The list's key line, and lines that look like it.
KEY_LINES = (
    "nonMasqueradeCIDRs:\n", "nonMasqueradeCIDRs:   \n", "nonMasqueradeCIDRs: # c\n", "nonMasqueradeCIDRs:   #c: x\n",
    "nonMasqueradeCIDRs:#c\n", "nonMasqueradeCIDRs :\n", "nonMasqueradeCIDRs:\r\n", "NonMasqueradeCIDRs:\n",
    "nonmasqueradecidrs:\n", "nonMasqueradeCIDRs: !!seq\n", "nonMasqueradeCIDRs: !!str\n", "nonMasqueradeCIDRs: &x\n",
    '"nonMasqueradeCIDRs":\n', "  nonMasqueradeCIDRs:\n", "nonMasqueradeCIDRs:\t\n", "nonMasqueradeCIDRs: ~\n",
    "? nonMasqueradeCIDRs\n:\n", "nonMasqueradeCIDRs: |\n", "nonMasqueradeCIDRs:", "nonMasqueradeCIDRsX:\n",
)
#: The list: the shapes the fast path takes, and many it must not misread.
LISTS = (
    "  - 10.0.0.0/8\n  - 192.168.0.0/16\n",
    "- 10.0.0.0/8\n- 192.168.0.0/16\n",
    "    - 10.0.0.0/8\n    - 172.16.0.0/12\n",
    "  - '10.0.0.0/8'\n  - \"192.168.0.0/16\"\n",
    "  -   10.0.0.0/8   \n  - 192.168.0.0/16 # office\n",
    "\n  # first\n  - 10.0.0.0/8\n\n# column 0\n      # deeper\n  - 192.168.0.0/16\n   \n",
    "  - 10.0.0.0/8\n  - 10.0.0.0/8\n  - 192.168.0.0/16\n  - 10.0.0.0/8\n",
    "  - 10.0.0.1/8\n  - 1.2.3.4/33\n  - 10.0.0.0/08\n  - 10.0.0.00/8\n  - 10.0.0.0/8/8\n",
    "  - fd00::/8\n  - ::/0\n  - ::ffff:10.0.0.0/104\n  - FD00::/8\n  - fd00::/8\n",
    "  - :/8\n  - .5/8\n  - 1e5/8\n  - 0x1F/8\n  - 1:30/8\n  - ::/000\n  - 10.0.0.0/0008\n",
    "  - 10.0.0.0/8#c\n", "  - 10.0.0.0/8:\n", "  - 10.0.0.0/8: x\n", "  - 10.0.0.0/8 :x\n",
    "  - 10.0.0.0/8\n    192.168.0.0/16\n", "  - 10.0.0.0/8\n\n    192.168.0.0/16\n", "  - 10.0.0.0/8\n    # c\n",
    "  - 10.0.0.0/8\n   - 192.168.0.0/16\n", "  - 10.0.0.0/8\n - 192.168.0.0/16\n", "  - 10.0.0.0/8\n    - 1.0.0.0/8\n",
    "  - - 10.0.0.0/8\n", "  -\n    - 10.0.0.0/8\n", "  - [10.0.0.0/8]\n", "  - {a: 1}\n", "  -\n", "  - \n",
    "  - ~\n  - null\n  - 8\n  - true\n  - 1:30\n  - 1.5\n  - 0o17\n", "  - !!str 10.0.0.0/8\n",
    "  - &a 10.0.0.0/8\n  - *a\n", '  - "10.0.0.0/8\\n"\n', "  - 'it''s'\n", '  - "10.0.0.0/8\n    "\n',
    '  - "unterminated\n', "\t- 10.0.0.0/8\n", "  - 10.0.0.0/8\t# tab\n", "  -\t10.0.0.0/8\n",
    "  - 10.0.0.0/8\r\n  - 192.168.0.0/16\r\n", "  - ｆｄ００::/8\n", "  - 10.0.0.0/8 # ünïcode\n",
    "  - |\n    10.0.0.0/8\n", "  - >-\n    10.0.0.0/8\n", "  - 10.0.0.0/8\n  - -1.0.0.0/8\n",
    "  - 10.0.0.0/8\n  ---\n", "", "  # only a comment\n", "  - 10.0.0.0/8\n  -\n", "  - 10.0.0.0/8 \\\n",
    "  - 10.0.0.0/8\n  ? x\n", "  - 10.0.0.0/8\n  x: y\n", "  - 10.0.0.0/8 #c\n#\n  - 1.1.1.1/32 #\n",
    "  - \"\"\n  - ''\n", '  - "fd00::/8" #c\n', "  - '10.0.0.0/8'x\n", '  - "10.0.0.0/8"#c\n',
    "  - 10.0.0.0/8 #\n", "  - 10.0.0.0/32\n  - 10.0.0.1/32\n  - 10.0.0.0/31\n  - 10.0.0.0/30\n",
    "  - 0.0.0.0/0\n  - 255.255.255.255/32\n", "- 10.0.0.0/8\n  - 1.0.0.0/8\n", "- 10.0.0.0/8\n  # c\n- 1.0.0.0/8\n",
    "  - 10.0.0.0/8\n" + " " * 40 + "- 1.0.0.0/8\n", " " * 40 + "- 10.0.0.0/8\n",
    "  - 10.0.0.0/8\x00\n", "  - 10.0.0.0/8\n\x0c\n", "  - 10.0.0.0/8\n  - masqd-fast-path-list-placeholder/8\n",
    # YAML ends a comment at any line break (CR, NEL, LS, PS) and refuses control characters in it
    "  - 10.0.0.0/8 # a\r  - 1.0.0.0/8\n", "  - 10.0.0.0/8 # a\x85  - 1.0.0.0/8\n", "  # a\u2028  - 1.0.0.0/8\n",
    "  - 10.0.0.0/8\n  # a\u2029- 1.0.0.0/8\n", "  - 10.0.0.0/8 # bell\x07\n", "  # \x1b[31m\n  - 10.0.0.0/8\n",
)
#: What may follow the list.
SUFFIXES = (
    "", "cidrLimit: 5\n", "cidrLimit: 5", "masqLinkLocal: true\nresyncInterval: 30s\n", "...\n", "---\nfoo: 1\n",
    "--- \n", "- 1.2.3.4/32\n", "  indented: 1\n", "   \n  \n", ": x\n", "? y\n", "masqLinkLocal: yes\n",
    "nonMasqueradeCIDRs: [5.5.5.5/32]\n", "nonMasqueradeCIDRs:\n  - 6.6.6.6/32\n", "NonMasqueradeCIDRs: [7.7.7.7/32]\n",
    "x: *a\n", "<<: {cidrLimit: 3}\n", "<<: {nonMasqueradeCIDRs: [8.8.8.8/32]}\n", "cidrLimit: 1\ncidrLimit: 2\n",
    "# trailing\n", 'foo: "unterminated\n', "}\n", "]\n", "foo: [a, b]\n", "foo: {a: b}\n", "unknownKey: 1\n",
    "nonMasqueradeCidrs: []\n", "cidrLimit: 0\n", "masqLinkLocal: 1\n", "nonMasqueradeCIDRs:\n", "nonMasqueradeCIDRs: ~\n",
    "x: &a 1\n", "!!str x: 1\n", "%YAML 1.1\n", '"quoted key": 1\n', "'cidrLimit': 3\n", "null: 1\n", "1: 2\n",
    "[a]: 1\n", "? |\n  x\n: 1\n", "\tcidrLimit: 1\n", "cidrLimit: 1\r\n", "resyncInterval: 2024-01-01\n",
    "masqd-fast-path-list-placeholder: 1\n", "nonMasqueradeCIDRs: masqd-fast-path-list-placeholder\n", "#c\n  - 9.9.9.9/32\n", "\n- 9.9.9.9/32\n", "x:\n  - 1\n",
    "cidrLimit: ", "foo: |\n  - 9.9.9.9/32\n", "resyncInterval: 1h\ncidrLimit: 100010\n",
)
#: Shapes the fast path must take (else a big config pays the full loader).
TAKEN = (
    "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 192.168.0.0/16\n",
    "cidrLimit: 100010\nresyncInterval: 1h\nnonMasqueradeCIDRs:\n  - 10.0.0.0/28\n  - 10.0.0.32/28\n",
    "nonMasqueradeCIDRs:\n- 10.0.0.0/8\n- fd00::/8\nmasqLinkLocal: true\n",
    ("# generated\nnonMasqueradeCIDRs:  # the list\n\n  - '10.0.0.0/8'  # office\n  # vpn\n  - \"10.1.0.0/16\"\n"
     "cidrLimit: 100\n"),
    "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 10.0.0.1/8",
    "---\nnonMasqueradeCIDRs:\n    -   10.0.0.0/8   \n...\n",
)


def corpus() -> Iterator[str]:
    """Every pair of parts (prefix and key line, prefix and list, ..., list and suffix) with the
    common choice for the other two; each also without its final newline, and some with CRLF
    line ends or behind a byte order mark."""
    parts = (PREFIXES, KEY_LINES, LISTS, SUFFIXES)
    common = ("cidrLimit: 100\n", KEY_LINES[0], LISTS[0], "")
    texts = dict.fromkeys(TAKEN)
    for first, second in itertools.combinations(range(4), 2):
        for a, b in itertools.product(parts[first], parts[second]):
            chosen = list(common)
            chosen[first], chosen[second] = a, b
            texts["".join(chosen)] = None
    rng = random.Random(15)
    for text in texts:
        yield text
        yield text.rstrip("\n")
        if rng.random() < 0.1:
            yield text.replace("\n", "\r\n")
            yield "\ufeff" + text


def generated(rng: random.Random, count: int) -> str:
    """A long list mixing valid, duplicate, misaligned, IPv6 and odd items, quoted or not, with
    comments and blank lines, around the other keys."""
    items = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24" for _ in range(count)]
    items += rng.choices(["10.0.0.1/8", "fd00::/8", "1.2.3.4/33", "10.0.0.0/08", ":/8", "1e5/8", "10.0.0.0/8"], k=count // 10)
    rng.shuffle(items)
    lines = []
    for item in items:
        form = rng.random()
        if form < 0.05:
            lines.append(f"  - '{item}'\n")
        elif form < 0.1:
            lines.append(f'  - "{item}"  # note\n')
        elif form < 0.12:
            lines.append("\n  # group\n")
            lines.append(f"  - {item}\n")
        else:
            lines.append(f"  - {item}\n")
    return f"cidrLimit: {count * 2}\nresyncInterval: 1h\nnonMasqueradeCIDRs:\n{''.join(lines)}masqLinkLocal: true\n"


def typed(value: object) -> object:
    """``value`` with the type of every part spelled out (``1 == True``, ``1 == 1.0`` otherwise)."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(item) for item in value])
    return (type(value).__name__, repr(value))


def outcome(text: str, options: AgentOptions, *, fast: bool) -> object:
    """What ``parse_config`` makes of ``text``, as comparable values; with ``fast=False`` the
    fast path is switched off, so the full loader reads everything."""
    with pytest.MonkeyPatch.context() as patch:
        if not fast:
            patch.setattr(parse_module, "fast_document", lambda text, load: None)
        try:
            parsed = parse_config(text, options, source="c.yaml")
        except ConfigError as exc:
            return ("error", exc.source, repr(exc.problems), repr(exc.warnings), str(exc))
    return ("ok", repr(parsed.config), sorted(parsed.config.keys), repr(parsed.warnings))


def check(text: str, options_list=(V4, V6)) -> bool:
    """The fast path declines ``text`` or agrees with the full loader on it: the same document,
    and the same outcome of ``parse_config`` (a text it declines goes the full way anyway).
    Returns whether it took the text."""
    document = fast_document(text, _load_yaml)
    if document is None:
        return False
    try:
        full = _load_yaml(text)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"fast path read a document the full loader refuses ({exc!r}): {text!r}")
    assert typed(document) == typed(full), text
    for options in options_list:
        assert outcome(text, options, fast=True) == outcome(text, options, fast=False), text
    return True


def test_the_common_shapes_take_the_fast_path():
    for text in TAKEN:
        assert fast_document(text, _load_yaml) is not None, text
        check(text)


def test_fast_path_agrees_with_the_full_loader_on_odd_yaml():
    texts = list(corpus())
    taken = sum(check(text) for text in texts)
    assert len(texts) > 10_000 and taken > 1_000  # the corpus exercises the fast path, not only its refusals


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fast_path_agrees_on_long_generated_lists(seed):
    text = generated(random.Random(seed), 3000)
    assert check(text)
    bad = text.replace("  - 10.", "  -\t10.", 1)  # one tab: the full loader reads (and refuses) it
    assert not check(bad)


def test_big_list_parses_to_the_same_config_and_duplicates_warning():
    items = [f"10.{i // 256}.{i % 256}.0/24" for i in range(20_000)]
    text = "cidrLimit: 30000\nnonMasqueradeCIDRs:\n" + "".join(f"  - {c}\n" for c in items + items[:3])
    assert fast_document(text, _load_yaml) is not None
    parsed = parse_config(text, V4)
    assert [w.value for w in parsed.warnings] == items[:3]
    assert len(parsed.config.non_masquerade_cidrs) == 20_003
    assert outcome(text, V4, fast=True) == outcome(text, V4, fast=False)


@settings(max_examples=150, deadline=HANG_SECONDS * 1000, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents, indent=st.sampled_from([None, 2, 4]), comment=st.booleans())
def test_fast_path_agrees_on_dumped_documents(document, indent, comment):
    try:
        text = yaml.safe_dump(document, default_flow_style=False, indent=indent)
    except (yaml.YAMLError, UnicodeError, ValueError):
        return
    if comment:
        text = "# config\n" + text.replace("\n- ", "\n# item\n- ", 1)
    check(text)
