"""Hostile Kubernetes API objects: the ``ip-masq-agent`` ConfigMap and ``EgressNATPolicy`` objects
with wrong types, missing parts, deep nesting, huge lists, NUL bytes and bytes that are not UTF-8.

Whatever the server sends, the outcome is one of:

- a failure the reflector retries (:data:`masqd.kube.RETRIED`: an object the client cannot
  decode; the copy, and so the rules, stay as they were, and the retry relists);
- a :class:`~masqd.errors.ConfigError` naming the object (``configmap NAMESPACE/NAME``,
  ``EgressNATPolicy NAME``) and the field, with printable problems;
- a valid config whose rule texts (iptables and nftables, as ``masqd render`` writes them) are
  made only of fixed rule skeletons and networks that parse: nothing from the object (names,
  annotations, comments, unknown fields) reaches a rule.

Never another exception, a hang, or an outside string in a rule. The pure level feeds hypothesis
documents through the decoder the client itself uses on every listed or watched item
(lightkube's ``decode_object``) and then masqd's code (the ConfigMap input and the config loader,
the policy parser and the ``EgressNATPolicy`` plugin, the controller's translation). The domain is
what an API server can send: a JSON object with ``metadata.name`` (an API server always sets it);
anything else in it may be anything. The end-to-end tests serve hostile objects from the fake API
server to a running agent.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import re

import anyio
import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightkube.core.decoders import decode_object
from lightkube.resources.core_v1 import ConfigMap
from structlog.testing import capture_logs

from masqd.backends.iptables import IptablesBackend, destination_match
from masqd.backends.nftables import NftablesBackend, intervals_of
from masqd.config import MAX_CONFIG_BYTES, AgentOptions, MasqConfig, parse_config
from masqd.controller import MANAGED_POLICY, MAX_MESSAGE, ControllerOptions, translate
from masqd.default_plugins.egress import EgressNATPolicies
from masqd.errors import ConfigError
from masqd.inputs import ConfigLoader
from masqd.kube import RETRIED, EgressNATPolicy, KubeSettings, object_name
from masqd.plugins import Plugins
from masqd.policies import ACTIONS, MAX_DESTINATIONS, parse_policies, parse_policy, policy_name
from masqd.reconcile import plan_rules
from masqd.ruleset import RuleSet, compute_ruleset
from masqd.inputs import CONFIG_KEY, ConfigMapInput
from config_strategies import (
    DEST_MATCH,
    HANG_SECONDS,
    INJECTIONS,
    SAFE_RULE_CHARS,
    V4,
    V6,
    assert_clear_error,
    documents,
    dump_document,
    is_cidr,
    json_values,
    networks,
    rule_skeleton,
    strings_in,
    texts,
)
from support import REF, KubeAgent, cidrs_only, configmap, configmap_reflector, policy, watch_settings, write_atomically
from masqd.testing import wait_until

FUZZ = settings(max_examples=100, deadline=HANG_SECONDS * 1000,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SOURCE = f"configmap {REF}"


@pytest.fixture
def kube_settings(api, tmp_path) -> KubeSettings:
    return watch_settings(api, tmp_path)


# --- what every outcome must satisfy ---------------------------------------------------------------


class _NoTools:
    """An executor for backends that are only asked to render: any call is a test failure."""

    def __getattr__(self, name):
        raise AssertionError(f"render must not run tools (called {name})")


def _render_texts(ruleset: RuleSet) -> dict[str, str]:
    """What ``masqd render`` prints for ``ruleset`` with each kernel backend (pure)."""
    return {"iptables": IptablesBackend(_NoTools(), random_fully_supported=True).render(ruleset),
            "nftables": NftablesBackend(_NoTools()).render(ruleset)}


@functools.cache
def _skeletons(options: AgentOptions) -> tuple[frozenset[str], frozenset[str], str]:
    """The fixed lines each renderer writes for ``options`` (iptables lines with any destination
    replaced by ``<net>``; nftables lines but the set's elements), and all that text in one."""
    empty = MasqConfig(non_masquerade_cidrs=(), masq_link_local=True, masq_link_local_ipv6=True)
    some = MasqConfig(non_masquerade_cidrs=tuple(map(ipaddress.ip_network, ("192.0.2.0/24", "0.0.0.0/0", "::/0"))))
    texts_ = [_render_texts(compute_ruleset(config, options)) for config in (empty, some)]
    iptables = frozenset(line for t in texts_ for line in rule_skeleton(t["iptables"]))
    nftables = frozenset(line for t in texts_ for line in t["nftables"].splitlines() if "elements = {" not in line)
    every = "\n".join(text for t in texts_ for text in t.values())
    return iptables, nftables, every


_TABLE = re.compile(r"^table (ip6?) masqd \{$")
_ELEMENTS = re.compile(r"^\t\telements = \{ (.*) \}$")


def assert_rules_safe(ruleset: RuleSet, options: AgentOptions, inputs: list[str]) -> None:
    """Both rule texts hold only fixed skeletons and the rule set's networks (which are typed
    ``ipaddress`` networks), and no string of the object that is not also a skeleton or a CIDR."""
    for family in ruleset.families:
        for net in family.nonmasq:
            assert isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)) and net.version == family.family
    iptables_lines, nftables_lines, skeleton_text = _skeletons(options)
    rendered = _render_texts(ruleset)
    allowed = {destination_match(net).strip().removeprefix("-d ") for f in ruleset.families for net in f.nonmasq}
    text = rendered["iptables"]
    assert SAFE_RULE_CHARS.fullmatch(text), text
    for line, skeleton in zip(text.splitlines(), rule_skeleton(text)):
        assert skeleton in iptables_lines, line
        assert all(dest in allowed for dest in DEST_MATCH.findall(line)), line
    elements: dict[int, list] = {}  # family -> the networks its set holds
    table = None
    for line in rendered["nftables"].splitlines():
        if found := _TABLE.match(line):
            table = 4 if found.group(1) == "ip" else 6
        if found := _ELEMENTS.match(line):
            assert table is not None and table not in elements, line
            elements[table] = [ipaddress.ip_network(text) for text in found.group(1).split(", ")]  # strict: aligned
            assert all(net.version == table for net in elements[table]), line
        else:
            assert line in nftables_lines, line
    for family in ruleset.families:  # exactly the rule set's addresses, nothing else
        assert intervals_of(elements.pop(family.family, [])) == intervals_of(family.nonmasq)
    assert not elements
    for value in inputs:
        if len(value) >= 12 and value not in skeleton_text and not is_cidr(value):
            assert all(value not in text for text in rendered.values()), f"{value!r} reached a rule"


def receive(raw: bytes, resource: type):
    """What a reflector does with one listed or watched item: lightkube decodes it into
    ``resource``, and the reflector keys its copy by ``metadata.name``. A failure must be one the
    reflector retries (it keeps its copy and relists after a back-off); returns ``None`` then,
    else ``(name, object)``."""
    try:
        obj = decode_object(raw, resource)
        metadata = obj.metadata  # a generic object (EgressNATPolicy) decodes its metadata here
    except Exception as exc:
        assert isinstance(exc, RETRIED), f"{type(exc).__name__}: {exc}: the reflector would not retry it"
        return None
    if metadata is None or not metadata.name:
        return None  # no API server sends an object without a name (and lightkube reads it first)
    return object_name(obj), obj


def _wire(document: object, ascii_only: bool) -> bytes:
    """``document`` as a server would send it: JSON, ASCII with escapes or raw UTF-8 (lone
    surrogates as the bytes that encode them: not UTF-8)."""
    if ascii_only:
        return json.dumps(document).encode()
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


# --- strategies ------------------------------------------------------------------------------------

wrong = json_values.filter(lambda value: value is not None)  # any JSON value: mostly the wrong type
not_text = (st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**80)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.lists(json_values, max_size=4) | st.dictionaries(texts, json_values, max_size=4))
names = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,20}[a-z0-9])?", fullmatch=True) | texts | st.sampled_from(INJECTIONS)


def nested(value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value]
    return value


def _config_text(document: object, style: str) -> str:
    try:
        return dump_document(document, style)
    except Exception:  # not representable in that syntax
        return ""


config_texts = (
    st.builds(_config_text, documents, st.sampled_from(("json", "yaml", "yaml-flow")))
    | texts | st.sampled_from(INJECTIONS)
    | st.sampled_from((
        "nonMasqueradeCIDRs: [10.0.0.0/8]\x00\n-A POSTROUTING -j ACCEPT",
        "nonMasqueradeCIDRs: [" + ", ".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(1000)) + "]",
        "[" * 50_000 + "]" * 50_000,
        "x: &a [1]\ny: *a\n",
        "\ufeffnonMasqueradeCIDRs: [192.0.2.0/24]",
    ))
)
config_values = st.booleans().flatmap(lambda text: config_texts if text else not_text)  # half not a string

#: metadata as the API types it (the client refuses other types), with hostile content
typed_metadata = st.fixed_dictionaries({"name": names}, optional={
    "namespace": st.just(REF.namespace) | texts,
    "resourceVersion": st.integers(1, 10**9).map(str) | texts,
    "generation": st.integers(-(2**63), 2**63 - 1),
    "labels": st.dictionaries(texts, texts, max_size=3),
    "annotations": st.dictionaries(texts, texts | st.sampled_from(INJECTIONS), max_size=3),
})
#: metadata with any field of any type
any_metadata = st.fixed_dictionaries({"name": names | wrong}, optional={
    "namespace": st.just(REF.namespace) | texts | wrong,
    "resourceVersion": st.integers(1, 10**9).map(str) | texts | wrong,
    "generation": st.integers(-1, 2**70) | wrong,
    "labels": st.dictionaries(texts, texts, max_size=3) | wrong,
    "annotations": st.dictionaries(texts, texts | st.sampled_from(INJECTIONS), max_size=3) | wrong,
})
metadata = typed_metadata | any_metadata


def _with_extra_keys(values: st.SearchStrategy) -> st.SearchStrategy:
    """Mappings that may hold ``config`` (half the time) and other keys."""
    return st.fixed_dictionaries({}, optional={CONFIG_KEY: values}).flatmap(
        lambda known: st.dictionaries(st.sampled_from(("Config", "config ", "other")) | texts, values, max_size=2)
        .map(lambda extra: {**extra, **known}))


binary_values = st.binary(max_size=30).map(lambda data: base64.b64encode(data).decode())
#: the ConfigMap as the API types it (the fields the client checks are right), hostile data
typed_configmaps = st.fixed_dictionaries(
    {"apiVersion": st.just("v1"), "kind": st.just("ConfigMap"),
     "metadata": typed_metadata.map(lambda meta: {**meta, "name": REF.name}),
     "data": st.fixed_dictionaries({CONFIG_KEY: config_values}).flatmap(
         lambda known: _with_extra_keys(config_values).map(lambda extra: {**extra, **known}))},
    optional={"binaryData": _with_extra_keys(binary_values), "immutable": st.booleans()},
)
#: any field of any type, any name, data missing or not a mapping
any_configmaps = st.fixed_dictionaries(
    {"apiVersion": st.just("v1") | wrong, "kind": st.just("ConfigMap") | wrong,
     "metadata": metadata.flatmap(lambda meta: st.sampled_from((REF.name, meta["name"]))
                                  .map(lambda name: {**meta, "name": name}))},
    optional={
        "data": _with_extra_keys(config_values) | wrong,
        "binaryData": _with_extra_keys(binary_values | wrong) | wrong,
        "immutable": st.booleans() | wrong,
    },
)
#: half typed, a quarter with anything anywhere, a quarter any JSON value at all
configmaps = st.sampled_from((typed_configmaps, typed_configmaps, any_configmaps, json_values)).flatmap(lambda s: s)

cidr_values = networks() | st.sampled_from(("10.0.0.1/8", "10.0.0.0/8", "fd00::/8", "2001:db8::/32", "0.0.0.0/0",
                                            "192.0.2.0/24\x00", "192.0.2.0/24\n-j ACCEPT")) | texts | wrong \
    | st.integers(1, 400).map(lambda depth: nested("10.0.0.0/8", depth))
destination = (
    st.fixed_dictionaries({"cidr": cidr_values}, optional={"comment": texts | st.sampled_from(INJECTIONS)})
    | st.fixed_dictionaries({"cidrBlock": cidr_values})  # a field name that is not GKE's
    | st.dictionaries(texts, json_values, max_size=3)
    | wrong
)
destination_lists = (
    st.lists(destination, max_size=8)
    | st.integers(MAX_DESTINATIONS - 2, MAX_DESTINATIONS + 2000).map(lambda n: [{"cidr": "10.0.0.0/8"}] * n)  # huge
    | wrong
)
valid_specs = st.fixed_dictionaries({
    "action": st.sampled_from(ACTIONS),
    "destinations": st.lists(st.fixed_dictionaries({"cidr": networks()}), min_size=1, max_size=6),
})
specs = valid_specs | st.fixed_dictionaries({}, optional={
    "action": st.sampled_from((*ACTIONS, "nosnat", "NoSNAT\x00", " NoSNAT", "MASQUERADE")) | wrong,
    "destinations": destination_lists,
    "comment": texts | st.sampled_from(INJECTIONS),
}) | wrong
policies = (
    st.fixed_dictionaries(  # typed as the client checks it (metadata), the spec anything
        {"apiVersion": st.just("networking.gke.io/v1"), "kind": st.just("EgressNATPolicy"), "metadata": typed_metadata,
         "spec": specs},
        optional={"status": json_values})
    | st.fixed_dictionaries(  # any field of any type, the spec maybe missing
        {"apiVersion": st.just("networking.gke.io/v1") | wrong, "kind": st.just("EgressNATPolicy") | wrong,
         "metadata": metadata},
        optional={"spec": specs, "status": json_values})
    | st.dictionaries(texts, json_values, max_size=4).flatmap(  # an arbitrary object, named
        lambda extra: metadata.map(lambda meta: {**extra, "metadata": meta}))
)

# --- the ConfigMap ----------------------------------------------------------------------------------


def check_configmap(obj: ConfigMap, options: AgentOptions) -> None:
    """The ConfigMap input takes the reflector's copy; the loader parses it as a config source."""
    name = object_name(obj)
    config_input = ConfigMapInput(REF, KubeSettings(configmap=REF))
    reason = config_input.update({name: obj})
    assert reason is None or isinstance(reason, str)
    data = obj.data if name == REF.name else None
    value = (data or {}).get(CONFIG_KEY)
    try:
        loaded = ConfigLoader([config_input], options).load()
    except ConfigError as exc:
        assert_clear_error(exc)
        assert exc.source == SOURCE, exc
        if not isinstance(value, str):
            [problem] = exc.problems
            assert problem.key == f"data.{CONFIG_KEY}" and "expected a string" in problem.reason
        else:  # exactly what the text itself gives
            with pytest.raises(ConfigError) as direct:
                parse_config(value, options, source=SOURCE)
            assert list(map(str, direct.value.problems)) == list(map(str, exc.problems))
        return
    if value is None:  # no ConfigMap, or no config key in it: not a source, the defaults apply
        assert loaded.config == parse_config(None, options).config
    else:
        assert isinstance(value, str) and loaded.config == parse_config(value, options).config
    inputs = strings_in(obj.to_dict())
    assert_rules_safe(compute_ruleset(loaded.config, options), options, inputs)


@FUZZ
@given(document=configmaps, ascii_only=st.booleans(), options=st.sampled_from((V4, V6)))
def test_any_configmap_object_is_a_config_or_a_clear_error(document, ascii_only, options):
    received = receive(_wire(document, ascii_only), ConfigMap)
    if received is not None:
        check_configmap(received[1], options)


@FUZZ
@given(junk=st.binary(max_size=60), where=st.sampled_from(("body", "config", "name", "key")),
       options=st.sampled_from((V4, V6)))
def test_bytes_that_are_not_json_or_not_utf8(junk, where, options):
    raw = {
        "body": junk,
        "config": b'{"metadata":{"name":"ip-masq-agent"},"data":{"config":"nonMasqueradeCIDRs: [' + junk + b']"}}',
        "name": b'{"metadata":{"name":"' + junk + b'"},"data":{"config":"nonMasqueradeCIDRs: []"}}',
        "key": b'{"metadata":{"name":"ip-masq-agent"},"data":{"' + junk + b'":"x","config":"{}"}}',
    }[where]
    received = receive(raw, ConfigMap)
    if received is not None:
        check_configmap(received[1], options)
    policy_raw = b'{"metadata":{"name":"x"},"spec":{"action":"NoSNAT","destinations":[{"cidr":"' + junk + b'"}]}}'
    received = receive(policy_raw, EgressNATPolicy)
    if received is not None:
        check_policies({received[0]: received[1]}, options)


@pytest.mark.parametrize(("value", "shown"), [
    pytest.param(5, "5", id="number"),
    pytest.param(["10.0.0.0/8"], "['10.0.0.0/8']", id="list"),
    pytest.param({"nonMasqueradeCIDRs": ["10.0.0.0/8"]}, "{'nonMasqueradeCIDRs': ['10.0.0.0/8']}", id="mapping"),
    pytest.param(True, "True", id="boolean"),
    pytest.param(["x"] * 100_000, "\"['x', 'x', ", id="huge-list-shortened"),
])
def test_a_config_key_that_is_not_a_string_is_an_error_naming_the_field(value, shown):
    # The API types ConfigMap data as strings; a server (or a proxy) that sends anything else
    # gets an error naming the object and the field, not an internal error on every pass.
    obj = ConfigMap.from_dict({"metadata": {"name": REF.name, "namespace": REF.namespace, "resourceVersion": "7"},
                               "data": {CONFIG_KEY: value}})
    config_input = ConfigMapInput(REF, KubeSettings(configmap=REF))
    assert config_input.update({REF.name: obj}) == f"{REF}@7"
    with pytest.raises(ConfigError) as caught:
        ConfigLoader([config_input], V4).load()
    assert caught.value.source == SOURCE
    [problem] = caught.value.problems
    assert problem.key == "data.config" and problem.reason == "expected a string holding the config (YAML or JSON)"
    assert str(caught.value).startswith(f"invalid config {SOURCE}: data.config: {shown}")
    assert len(str(caught.value)) < 300


# --- EgressNATPolicy -----------------------------------------------------------------------------


_PROBLEM_KEY = re.compile(r"spec(\.action|\.destinations(\[\d+\]\.cidr)?)?")


def check_policy(obj: object, allow_ipv6: bool) -> None:
    """One policy: a typed :class:`Policy` built only from its destinations, or an error naming it."""
    name = policy_name(obj)
    try:
        parsed = parse_policy(obj, allow_ipv6=allow_ipv6)
    except ConfigError as exc:
        assert_clear_error(exc)
        assert exc.source == f"EgressNATPolicy {name if name.isprintable() else repr(name)}"
        assert all(_PROBLEM_KEY.fullmatch(p.key) for p in exc.problems), exc.problems
        return
    assert parsed.name == name and parsed.action in ACTIONS
    given_cidrs = {item["cidr"] for item in obj["spec"]["destinations"]}
    assert {str(net) for net in parsed.cidrs + parsed.ignored} <= given_cidrs
    assert all(net.version == 4 or allow_ipv6 for net in parsed.cidrs)
    assert all(net.version == 6 and not allow_ipv6 for net in parsed.ignored)
    assert len(set(parsed.cidrs)) == len(parsed.cidrs)
    assert parsed.generation is None or isinstance(parsed.generation, int)


@functools.cache
def _agent_config(options: AgentOptions) -> MasqConfig:
    return parse_config("nonMasqueradeCIDRs: []\n", options).config  # every rule CIDR from the policies


def check_policies(objects: dict, options: AgentOptions) -> None:
    """The plugin takes the reflector's copy; a reconcile plans with it (as ``masqd render`` does):
    invalid policies are skipped and logged by name, never fatal, and only networks reach rules."""
    plugins = Plugins.load(entry_points=False)  # a fresh plugin each time: it logs each finding once
    plugin = next(p for p in plugins.pm.get_plugins() if isinstance(p, EgressNATPolicies))
    assert plugin.update(objects) is not None or not objects
    with capture_logs() as logs:
        ruleset, contributions = anyio.run(plan_rules, _agent_config(options), options, plugins)
    expected = parse_policies(objects.values(), allow_ipv6=options.enable_ipv6)
    assert {net for c in contributions for net in c.cidrs} == set(expected.nonmasq_origins())
    assert [exc.source for exc in plugin.policies.invalid] == [exc.source for exc in expected.invalid]
    skipped = [entry for entry in logs if entry["event"] == "EgressNATPolicy skipped: invalid"]
    assert [f"EgressNATPolicy {entry['policy']}" for entry in skipped] == [exc.source for exc in expected.invalid]
    for entry in skipped:
        assert entry["problems"] and all(p.isprintable() and p.startswith("spec") for p in entry["problems"])
    assert_rules_safe(ruleset, options, [s for obj in objects.values() for s in strings_in(dict(obj))])


@FUZZ
@given(document=policies, allow_ipv6=st.booleans())
def test_any_policy_object_is_a_policy_or_a_clear_error(document, allow_ipv6):
    check_policy(document, allow_ipv6)  # the pure parser, on the object as built
    received = receive(_wire(document, ascii_only=True), EgressNATPolicy)
    if received is not None:
        check_policy(received[1], allow_ipv6)  # and as the client hands it over


@FUZZ
@given(documents_=st.lists(policies, max_size=6), ascii_only=st.booleans(), options=st.sampled_from((V4, V6)))
def test_any_set_of_policies_renders_only_networks(documents_, ascii_only, options):
    objects = {}
    for document in documents_:
        received = receive(_wire(document, ascii_only), EgressNATPolicy)
        if received is not None:
            objects[received[0]] = received[1]  # the reflector's copy: the last object of each name
    check_policies(objects, options)


@FUZZ
@given(documents_=st.lists(policies, max_size=6), ipv6=st.booleans())
def test_the_controller_translates_any_policies_into_a_valid_configmap(documents_, ipv6):
    options = ControllerOptions(REF, enable_ipv6=ipv6)
    translation = translate(documents_, [], options)
    agent = AgentOptions(enable_ipv6=ipv6)
    parsed = parse_config(translation.config_text, agent, source=SOURCE)  # what every agent reads: valid
    assert parsed.config.non_masquerade_cidrs == translation.cidrs and not parsed.warnings
    assert set(translation.statuses) == {policy_name(d) for d in documents_} - {MANAGED_POLICY}
    for status in translation.statuses.values():
        assert status.message.isprintable() and len(status.message) <= MAX_MESSAGE
    inputs = [s for d in documents_ for s in strings_in(d)]
    for value in inputs:
        if len(value) >= 12 and not is_cidr(value) and value not in "nonMasqueradeCIDRs:\ncidrLimit: ":
            assert value not in translation.config_text
    assert_rules_safe(compute_ruleset(parsed.config, agent), agent, inputs)


def test_a_deeply_nested_policy_is_refused_by_the_decoder_as_a_retried_failure():
    # A schema-less CRD lets an object nest as deep as the API server's JSON decoder allows
    # (10,000 levels); lightkube's decoder refuses it with a RecursionError, which the reflector
    # must treat as a failure to retry (and relist), not as a crash of its source.
    raw = b'{"metadata":{"name":"deep"},"spec":{"destinations":[{"cidr":' + b"[" * 20_000 + b"]" * 20_000 + b"}]}}"
    with pytest.raises(RecursionError) as caught:
        decode_object(raw, EgressNATPolicy)
    assert isinstance(caught.value, RETRIED)
    assert receive(raw, EgressNATPolicy) is None


def test_a_huge_policy_is_refused_by_count_without_parsing_each_destination():
    obj = policy("huge", "NoSNAT", *["not a cidr"] * 200_000)
    with pytest.raises(ConfigError) as caught:
        parse_policy(obj, allow_ipv6=False)
    [problem] = caught.value.problems
    assert problem.key == "spec.destinations" and problem.value == "200000 items"
    assert str(caught.value) == ("invalid config EgressNATPolicy huge: spec.destinations: '200000 items': "
                                 "at most 1000 are accepted")


# --- end to end: hostile objects served to a running agent --------------------------------------------


def _deep_policy(name: str, depth: int) -> bytes:
    return (b'{"apiVersion":"networking.gke.io/v1","kind":"EgressNATPolicy","metadata":{"name":"' + name.encode()
            + b'"},"spec":{"action":"NoSNAT","destinations":[{"cidr":' + b"[" * depth + b'"10.0.0.0/8"'
            + b"]" * depth + b"}]}}")


async def test_hostile_configmaps_are_refused_by_name_and_the_agent_keeps_running(api, kube_settings, tmp_path):
    file = tmp_path / "ip-masq-agent"
    file.write_text(cidrs_only("192.0.2.0/24"))
    good = {"192.0.2.0/24", "10.0.0.0/8"}
    api.put(configmap(cidrs_only("10.0.0.0/8")))
    hostile = [
        ("nul-bytes", "nonMasqueradeCIDRs: [10.0.0.0/8]\x00\n-A POSTROUTING -j ACCEPT",
         "unacceptable character #x0000"),
        ("huge-list", json.dumps({"nonMasqueradeCIDRs": [f"10.{i // 256}.{i % 256}.0/24" for i in range(60_000)]}),
         "at most cidrLimit=64"),
        ("deep-nesting", "nonMasqueradeCIDRs: " + "[" * 100_000 + "]" * 100_000, "exceeded maximum nesting depth"),
        ("not-a-string", {"nonMasqueradeCIDRs": ["203.0.113.0/24"]}, "data.config: {'nonMasqueradeCIDRs'"),
        ("too-large", "# " + "x" * MAX_CONFIG_BYTES, "too large"),
    ]
    with capture_logs() as logs:
        async with KubeAgent(kube_settings, file) as agent:
            await agent.until_applied(good)
            for label, value, says in hostile:
                obj = configmap(None)
                obj["data"] = {CONFIG_KEY: value}
                api.put(obj)
                await wait_until(lambda: says in str(agent.status.last_error), f"the {label} ConfigMap refused")
                error = agent.status.last_error
                assert isinstance(error, ConfigError) and error.source == SOURCE, label
                assert len(str(error)) < 20_000, label  # excerpted, not pasted
                assert agent.applied() == good, label  # the rules last applied stay
                assert agent.status.sync_failure is None and agent.status.readiness()[0], label
                assert "ACCEPT" not in agent.backend.last_rendered and "\x00" not in agent.backend.last_rendered
            # data that is not a mapping: the client cannot decode the object; the watch retries
            # (relisting) and keeps its copy, and sees the fix
            obj = configmap(None)
            obj["data"] = "nonMasqueradeCIDRs: [203.0.113.0/24]"
            api.put(obj)
            reflector = configmap_reflector(agent)
            await wait_until(lambda: reflector.failures >= 1, "the undecodable ConfigMap retried")
            # binaryData only: no config key, so the ConfigMap contributes nothing (the file alone)
            api.put({**configmap(None), "binaryData": {CONFIG_KEY: base64.b64encode(b"\xff\x00").decode()}})
            await agent.until_applied({"192.0.2.0/24"}, "the file alone")
            api.put(configmap(cidrs_only("198.51.100.0/24")))
            await agent.until_applied({"192.0.2.0/24", "198.51.100.0/24"}, "a valid ConfigMap again")
            assert agent.status.last_error is None
    events = [entry["event"] for entry in logs]
    assert "internal error during sync; kernel keeps its previous rules" not in events
    assert "event source failed; restarting it" not in events
    refused = [entry for entry in logs if entry["event"] == "config rejected; keeping the rules last applied"]
    assert len(refused) == len(hostile) and all(entry["path"] == SOURCE for entry in refused)
    retried = [entry for entry in logs if entry["event"].startswith("Kubernetes API request failed")]
    assert retried and retried[0]["what"] == SOURCE
    assert re.fullmatch(r"ValidationError: .* - at `\$\.(items\[0\]\.)?data`", retried[0]["error"]), retried[0]
    assert any(entry["event"].startswith("ConfigMap has no 'config' key") for entry in logs)


async def test_hostile_policies_are_skipped_by_name_and_the_agent_keeps_running(api, kube_settings, tmp_path):
    file = tmp_path / "ip-masq-agent"
    file.write_text(cidrs_only("192.0.2.0/24"))
    api.put(policy("good", "NoSNAT", "198.51.100.0/24"))
    huge = policy("huge", "NoSNAT", *[f"10.{i // 256 % 256}.{i % 256}.0/24" for i in range(100_000)])  # 2 MB
    nul = policy("nul", "NoSNAT\x00", "203.0.113.0/24\x00-j ACCEPT")
    wrong_types = {**policy("wrong-types", "NoSNAT"), "spec": {"action": ["NoSNAT"], "destinations": "10.0.0.0/8"}}
    with capture_logs() as logs:
        async with KubeAgent(kube_settings, file) as agent:
            await agent.until_applied({"192.0.2.0/24", "198.51.100.0/24"})
            plugin = next(p for p in agent.agent.plugins.pm.get_plugins() if isinstance(p, EgressNATPolicies))
            for obj in (huge, nul, wrong_types):
                api.put(obj)
            api.put(policy("after", "NoSNAT", "203.0.113.0/24"))
            await agent.until_applied({"192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"}, "the valid policies")
            assert {exc.source for exc in plugin.policies.invalid} == {
                "EgressNATPolicy huge", "EgressNATPolicy nul", "EgressNATPolicy wrong-types"}
            assert agent.status.last_error is None  # skipped, not a rejected state

            # Nested deeper than the client's decoder goes (msgspec counts against the recursion
            # limit, from the agent's deep stack) but not the fake server's own JSON (a shallow
            # thread): the policy watch fails and retries, keeping its copy; everything else goes on.
            deep = httpx2.post(f"{api.url}/apis/networking.gke.io/v1/egressnatpolicies",
                               content=_deep_policy("deep", 950), headers={"Content-Type": "application/json"})
            assert deep.status_code == 201, deep.text[:200]
            await wait_until(lambda: any(e["event"].startswith("Kubernetes API request failed") for e in logs),
                             "the undecodable policy reported")
            write_atomically(file, cidrs_only("192.0.2.0/24 100.64.0.0/10"))
            await agent.until_applied({"192.0.2.0/24", "100.64.0.0/10", "198.51.100.0/24", "203.0.113.0/24"},
                                      "a file edit while the policy watch is failing")
            deleted = httpx2.delete(f"{api.url}/apis/networking.gke.io/v1/egressnatpolicies/deep")
            assert deleted.status_code == 200
            api.put(policy("after-deep", "NoSNAT", "198.18.0.0/15"))
            await agent.until_applied({"192.0.2.0/24", "100.64.0.0/10", "198.51.100.0/24", "203.0.113.0/24",
                                       "198.18.0.0/15"}, "the policy watch recovered after the deletion")
            rules = agent.backend.last_rendered
            assert "\x00" not in rules and "ACCEPT" not in rules and "huge" not in rules
    events = [entry["event"] for entry in logs]
    assert "internal error during sync; kernel keeps its previous rules" not in events
    assert "event source failed; restarting it" not in events
    skipped = {entry["policy"]: entry["problems"] for entry in logs
               if entry["event"] == "EgressNATPolicy skipped: invalid"}
    assert skipped["huge"] == ["spec.destinations: '100000 items': at most 1000 are accepted"]
    assert skipped["nul"] == ["spec.action: 'NoSNAT\\x00': expected one of NoSNAT, SNAT",
                              "spec.destinations[0].cidr: '203.0.113.0/24\\x00-j ACCEPT': not a CIDR: expected an IPv4 "
                              "or IPv6 address, '/', and a prefix length, e.g. '10.0.0.0/8' or 'fd00::/8'"]
    assert [p.split(":")[0] for p in skipped["wrong-types"]] == ["spec.action", "spec.destinations"]
    failed = next(e for e in logs if e["event"].startswith("Kubernetes API request failed"))
    assert failed["what"] == "EgressNATPolicy objects" and failed["error"].startswith("RecursionError")
