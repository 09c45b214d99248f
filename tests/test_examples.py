"""The Kubernetes manifests in ``examples/kubernetes``: what a user applying them relies on.

Every file parses (no duplicate keys), sample policies pass the CRD's schema and broken ones do
not, the CIDR pattern agrees with masqd's own parser, RBAC grants what the flags in the workloads
need and nothing more, and the workloads run with the privileges the README promises. The
ConfigMaps of ``examples/decision-model`` (one per feature beyond upstream) are checked at the end:
each is accepted without warnings and decides, on both backends' rules, what its comment says.

There is no API server here, so the CRD's ``openAPIV3Schema`` is checked by a small validator for
the subset of OpenAPI v3 the CRD uses. It refuses a schema with any keyword it does not implement,
so a keyword added to the CRD cannot be silently skipped by these tests.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from deploy_files import (IMAGE, KUBERNETES as EXAMPLES, REPO, StrictLoader, agent_grants, controller_grants,
                          manifest_documents, manifest_object, rbac_allows, rbac_grants)

from masqd.cidrs import CIDRError, parse_cidr
from masqd.config import AgentOptions, parse_config

#: The API objects (kustomization.yaml is kustomize's input, not one: test_deploy.py checks it).
MANIFEST_FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml")
POLICY_FILES = sorted((EXAMPLES / "policies").glob("*.yaml"))

READ_VERBS = {"get", "list", "watch"}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "EgressNATPolicy"}


# --- loading ---------------------------------------------------------------------------------


def _file(name: str) -> tuple[dict, ...]:
    return manifest_documents(EXAMPLES / name)


def _one(name: str, kind: str) -> dict:
    return manifest_object(EXAMPLES / name, kind)


def _crd() -> dict:
    return _one("egressnatpolicy-crd.yaml", "CustomResourceDefinition")


def _schema() -> dict:
    (version,) = _crd()["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def _cidr_pattern() -> str:
    return _schema()["properties"]["spec"]["properties"]["destinations"]["items"]["properties"]["cidr"]["pattern"]


def _pod_spec(name: str, kind: str) -> dict:
    return _one(name, kind)["spec"]["template"]["spec"]


def _container(name: str, kind: str) -> dict:
    (container,) = _pod_spec(name, kind)["containers"]
    return container


def _flag(container: dict, flag: str) -> str:
    """The value of ``--flag=VALUE`` in a container's args (exactly one occurrence)."""
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{flag}=")]
    assert len(values) == 1, f"--{flag} given {len(values)} times in {container['args']}"
    return values[0]


def _sample_policies() -> list[dict]:
    return [doc for path in POLICY_FILES for doc in manifest_documents(path)]


def _sample_cidrs() -> list[str]:
    cidrs = [d["cidr"] for p in _sample_policies() for d in p["spec"]["destinations"]]
    config = yaml.safe_load(_one("configmap.yaml", "ConfigMap")["data"]["config"])
    return cidrs + config["nonMasqueradeCIDRs"]


# --- a validator for the subset of OpenAPI v3 the CRD uses -------------------------------------

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})")
_VALIDATING = {"type", "properties", "required", "items", "enum", "pattern", "minItems", "maxItems",
               "minLength", "maxLength", "minimum", "format", "x-kubernetes-list-type",
               "x-kubernetes-list-map-keys"}
_ANNOTATING = {"description"}


def _go_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` with the API server's semantics (Go RE2, unanchored search): Go's ``$``
    matches only at the very end, Python's also before a final newline, so it becomes ``\\Z``."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _check_format(fmt: str, value: Any) -> bool:
    if fmt == "date-time":
        if not _RFC3339.fullmatch(value):
            return False
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return False
        return True
    if fmt == "int64":
        return -(2**63) <= value < 2**63
    raise AssertionError(f"format {fmt!r} is not implemented by this validator")


def validate(value: Any, schema: dict, path: str = "") -> list[str]:
    """Every way ``value`` violates ``schema``, each as ``path: reason``; empty when valid."""
    unknown = set(schema) - _VALIDATING - _ANNOTATING
    assert not unknown, f"{path or '<root>'}: schema keywords {sorted(unknown)} are not implemented by this validator"
    where = path or "<root>"
    expected = schema.get("type")
    if expected is not None and not _TYPES[expected](value):
        return [f"{where}: expected {expected}, got {type(value).__name__}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not _go_regex(schema["pattern"]).search(value):
            errors.append(f"{where}: {value!r} does not match the pattern")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than minLength {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than maxLength {schema['maxLength']}")
    if "format" in schema and not _check_format(schema["format"], value):
        errors.append(f"{where}: {value!r} is not a valid {schema['format']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{where}: required field {key!r} is missing")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += validate(value[key], sub, f"{path}.{key}" if path else key)
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: fewer than minItems {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: more than maxItems {schema['maxItems']}")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], f"{where}[{i}]")
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"])
                    for item in value if isinstance(item, dict)]
            if len(keys) != len(set(keys)):
                errors.append(f"{where}: duplicate entries for list-map keys {schema['x-kubernetes-list-map-keys']}")
    return errors


def _policy(action: Any = "NoSNAT", destinations: Any = None, **extra: Any) -> dict:
    spec = {"action": action, "destinations": [{"cidr": "10.0.0.0/8"}] if destinations is None else destinations}
    return {"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy", "metadata": {"name": "p"},
            "spec": spec, **extra}


def _condition(**overrides: Any) -> dict:
    condition = {"type": "Accepted", "status": "True", "reason": "Valid", "message": "2 destinations in effect",
                 "lastTransitionTime": "2024-05-01T12:00:00Z", "observedGeneration": 3}
    return {**condition, **overrides}


# --- every manifest ----------------------------------------------------------------------------


def test_the_examples_directory_holds_the_documented_files():
    names = {str(p.relative_to(EXAMPLES)) for p in MANIFEST_FILES}
    assert {"egressnatpolicy-crd.yaml", "agent-rbac.yaml", "agent-daemonset.yaml", "controller-rbac.yaml",
            "controller-deployment.yaml", "configmap.yaml"} <= names
    assert len(POLICY_FILES) >= 2


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(EXAMPLES))) for p in MANIFEST_FILES])
def test_manifest_parses_and_names_its_objects(path):
    docs = manifest_documents(path)
    assert docs, f"{path} holds no document"
    assert [d for d in yaml.safe_load_all(path.read_text()) if d is not None] == list(docs)
    for doc in docs:
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
        assert isinstance(doc.get("kind"), str) and doc["kind"], doc
        assert isinstance(doc.get("metadata", {}).get("name"), str) and doc["metadata"]["name"], doc
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], f"{doc['kind']} {doc['metadata']['name']} is cluster scoped"
        else:
            assert doc["metadata"].get("namespace") == "kube-system", f"{doc['kind']} {doc['metadata']['name']}"


def test_duplicate_keys_are_refused_by_the_loader():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'args'"):
        list(yaml.load_all("args: [a]\nargs: [b]\n", Loader=StrictLoader))


def test_readme_explains_every_file():
    readme = (EXAMPLES / "README.md").read_text()
    for path in MANIFEST_FILES:
        assert str(path.relative_to(EXAMPLES)) in readme, f"README.md does not mention {path.name}"


@pytest.mark.parametrize("name, kind", [
    pytest.param("agent-daemonset.yaml", "DaemonSet", id="agent"),
    pytest.param("controller-deployment.yaml", "Deployment", id="controller"),
])
def test_workloads_run_the_released_image(name, kind):
    workload = _one(name, kind)
    assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    for container in _pod_spec(name, kind)["containers"]:
        assert container["image"] == IMAGE
        assert container["command"] == ["masqd"]


# --- the CRD and its schema --------------------------------------------------------------------


def test_crd_is_cluster_scoped_gke_v1_with_status():
    crd = _crd()
    spec = crd["spec"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}" == "egressnatpolicies.networking.gke.io"
    assert spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == "EgressNATPolicy"
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
    assert version["subresources"] == {"status": {}}


def _schema_nodes(schema: dict, path: str = ""):
    yield path or "<root>", schema
    for key, sub in schema.get("properties", {}).items():
        yield from _schema_nodes(sub, f"{path}.{key}")
    if "items" in schema:
        yield from _schema_nodes(schema["items"], f"{path}[]")


def test_schema_is_structural_and_within_the_validator():
    """The API server refuses a CRD whose schema node lacks a type; the validator refuses keywords
    it does not implement (checked by running it on every node)."""
    for where, node in _schema_nodes(_schema()):
        assert node.get("type") in _TYPES, f"{where} has no usable type"
        assert set(node) <= _VALIDATING | _ANNOTATING, f"{where}: {sorted(set(node) - _VALIDATING - _ANNOTATING)}"
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            assert set(node["x-kubernetes-list-map-keys"]) <= set(item.get("required", ())), f"{where}: map keys must be required"


@pytest.mark.parametrize("column", [pytest.param(c, id=c["name"]) for c in _crd()["spec"]["versions"][0]["additionalPrinterColumns"]])
def test_printer_columns_point_into_the_schema(column):
    path = re.sub(r"\[\?\(.*?\)\]", "[]", column["jsonPath"])
    if path.startswith(".metadata."):
        return
    node = _schema()
    for part in re.findall(r"\.(\w+)(\[\])?", path):
        node = node["properties"][part[0]]
        if part[1]:
            node = node["items"]
    assert node["type"] == column["type"] == "string"
    for field in re.findall(r"@\.(\w+)", column["jsonPath"]):  # a filter names a field of the items
        assert field in _schema()["properties"]["status"]["properties"]["conditions"]["items"]["properties"]


def test_printer_columns_are_action_accepted_age():
    columns = _crd()["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == ["Action", "Accepted", "Age"]


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in POLICY_FILES])
def test_sample_policy_is_valid(path):
    (policy,) = manifest_documents(path)
    assert (policy["apiVersion"], policy["kind"]) == ("networking.gke.io/v1", "EgressNATPolicy")
    assert validate(policy, _schema()) == []


@pytest.mark.parametrize("policy", [
    pytest.param(_policy(action="SNAT"), id="action-SNAT"),
    pytest.param(_policy(destinations=[{"cidr": f"10.{i // 256}.{i % 256}.0/24"} for i in range(1000)]), id="1000-destinations"),
    pytest.param(_policy(status={"conditions": [_condition()]}), id="status-accepted"),
    pytest.param(_policy(status={"conditions": [_condition(status="False", reason="InvalidCIDR", message="10.0.0.1/8: host bits set"),
                                                 _condition(type="masqd.io/Applied", lastTransitionTime="2024-05-01T12:00:00.5+02:00")]}),
                 id="status-two-conditions"),
    pytest.param(_policy(status={}), id="status-empty"),
])
def test_valid_policy_is_accepted(policy):
    assert validate(policy, _schema()) == []


@pytest.mark.parametrize("policy, reason", [
    pytest.param(_policy(action="Masquerade"), "spec.action: 'Masquerade' is not one of", id="bad-action"),
    pytest.param(_policy(action="nosnat"), "spec.action: 'nosnat' is not one of", id="action-wrong-case"),
    pytest.param(_policy(destinations=[{}]), "spec.destinations[0]: required field 'cidr'", id="missing-cidr"),
    pytest.param(_policy(destinations=[{"cidr": "10.0.0.1/33"}]), "does not match the pattern", id="prefix-33"),
    pytest.param(_policy(destinations=[{"cidr": "not-a-cidr"}]), "does not match the pattern", id="not-a-cidr"),
    pytest.param(_policy(destinations=[{"cidr": 10}]), "spec.destinations[0].cidr: expected string", id="cidr-not-string"),
    pytest.param(_policy(destinations=[]), "fewer than minItems 1", id="no-destinations"),
    pytest.param(_policy(destinations=[{"cidr": "10.0.0.0/8"}] * 1001), "more than maxItems 1000", id="1001-destinations"),
    pytest.param(_policy(destinations="10.0.0.0/8"), "spec.destinations: expected array", id="destinations-not-list"),
    pytest.param({"apiVersion": "networking.gke.io/v1", "kind": "EgressNATPolicy", "metadata": {"name": "p"}},
                 "required field 'spec'", id="missing-spec"),
    pytest.param({**_policy(), "spec": {"destinations": [{"cidr": "10.0.0.0/8"}]}}, "required field 'action'", id="missing-action"),
    pytest.param(_policy(status={"conditions": [_condition(status="Yes")]}), "'Yes' is not one of", id="condition-status"),
    pytest.param(_policy(status={"conditions": [_condition(lastTransitionTime="yesterday")]}), "is not a valid date-time",
                 id="condition-time"),
    pytest.param(_policy(status={"conditions": [_condition(reason="bad reason!")]}), "does not match the pattern",
                 id="condition-reason"),
    pytest.param(_policy(status={"conditions": [_condition(observedGeneration=-1)]}), "below the minimum 0",
                 id="condition-generation"),
    pytest.param(_policy(status={"conditions": [_condition(), _condition()]}), "duplicate entries", id="condition-twice"),
])
def test_invalid_policy_is_rejected(policy, reason):
    errors = validate(policy, _schema())
    assert any(reason in e for e in errors), errors


# --- the CIDR pattern --------------------------------------------------------------------------

_ACCEPTED = [
    "0.0.0.0/0", "255.255.255.255/32", "100.64.0.0/10", "10.0.0.1/8",  # unaligned: refused by masqd, not the schema
    "::/0", "::1/128", "fe80::/10", "fd00::/8", "64:ff9b::/96", "2001:DB8::/32", "2001:0db8:0000::/48",
    "1:2:3:4:5:6:7:8/128", "1:2:3:4:5:6:7::/112", "::1:2:3:4:5:6:7/128", "1::2:3:4:5:6:7/128",
    "::ffff:192.0.2.0/120", "64:ff9b::192.0.2.0/120",
    "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255/128",  # the longest: maxLength
]
_REJECTED = [
    "", "not-a-cidr", "10.0.0.0", "10.0.0.1/33", "10.0.0.0/-1", "10.0.0.0/08", "010.0.0.0/8", "256.0.0.0/8",
    "10.0.0/8", "10.0.0.0.0/8", "10.0.0.0/255.0.0.0", "10.0.0.0/8/8", "10.0.0.0/8,192.168.0.0/16",
    " 10.0.0.0/8", "10.0.0.0/8 ", "10.0.0.0/8\n", "\n10.0.0.0/8", "10.0.0.0/\u0668",  # an Arabic-Indic 8
    "2001:db8::/129", "2001:db8:::/32", "2001:db8::1::/64", "1:2:3:4:5:6:7:8:9/64", "1:2:3:4:5:6:7/64",
    "12345::/16", "2001:db8::g/64", "fe80::1%eth0/64", "::ffff:300.0.0.0/120", "::ffff:1.2.3/120",
    "1.2.3.4::/64", ":/0", ":::/0", "[2001:db8::]/32",
]


@pytest.mark.parametrize("cidr", [pytest.param(c, id=c) for c in sorted(set(_sample_cidrs()))])
def test_pattern_accepts_every_sample_cidr(cidr):
    assert _go_regex(_cidr_pattern()).search(cidr)
    parse_cidr(cidr)  # and the agent takes it as it is: aligned, well formed


@pytest.mark.parametrize("cidr", [pytest.param(c, id=c) for c in _ACCEPTED])
def test_pattern_accepts_cidr_notation(cidr):
    assert _go_regex(_cidr_pattern()).search(cidr)
    assert len(cidr) <= _schema()["properties"]["spec"]["properties"]["destinations"]["items"]["properties"]["cidr"]["maxLength"]


@pytest.mark.parametrize("text", [pytest.param(t, id=repr(t)) for t in _REJECTED])
def test_pattern_rejects_garbage(text):
    assert not _go_regex(_cidr_pattern()).search(text)


def _agent_takes(text: str) -> bool:
    """masqd parses ``text`` as a CIDR, possibly refusing it only because host bits are set."""
    try:
        parse_cidr(text)
    except CIDRError as exc:
        return "not aligned" in exc.reason
    return True


def test_every_cidr_the_pattern_accepts_in_the_table_is_one_masqd_parses():
    for cidr in _ACCEPTED + _sample_cidrs():
        assert _agent_takes(cidr), cidr


_networks = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False))


@given(_networks)
def test_pattern_accepts_every_network_in_every_spelling(net):
    pattern = _go_regex(_cidr_pattern())
    spellings = [str(net), net.exploded, str(net).upper()]
    if net.version == 6:
        words = net.network_address.packed
        v4 = ipaddress.IPv4Address(words[12:])
        spellings.append(f"{ipaddress.IPv6Address(words[:12] + bytes(4)).exploded[:-10]}:{v4}/{net.prefixlen}")
    for text in spellings:
        assert pattern.search(text), text
        assert _agent_takes(text), text


@given(_networks, st.data())
def test_pattern_never_admits_what_masqd_refuses(net, data):
    """Mutate a valid CIDR (replace, insert or delete one character): whatever the pattern still
    accepts, masqd parses (the schema is never looser than the agent)."""
    text = str(net)
    i = data.draw(st.integers(0, len(text)))
    char = data.draw(st.sampled_from("0123456789abcdefABCDEFxg:./%- \n"))
    mutated = data.draw(st.sampled_from([text[:i] + char + text[i + 1:], text[:i] + char + text[i:], text[:i] + text[i + 1:]]))
    if _go_regex(_cidr_pattern()).search(mutated):
        assert _agent_takes(mutated), mutated
        ipaddress.ip_network(mutated, strict=False)


# --- RBAC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rbac_file", [pytest.param("agent-rbac.yaml", id="agent"), pytest.param("controller-rbac.yaml", id="controller")])
def test_rbac_has_no_wildcards_and_nothing_on_secrets(rbac_file):
    for doc in _file(rbac_file):
        for rule in doc.get("rules", ()):
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, ()), rule
            assert not any(r.split("/")[0] == "secrets" for r in rule["resources"]), rule
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"]), rule
            if "delete" in rule["verbs"]:  # only the policy the controller owns
                assert rule["resources"] == ["egressnatpolicies"] and rule["resourceNames"] == ["masqd-managed"], rule


@pytest.mark.parametrize("rbac_file", [pytest.param("agent-rbac.yaml", id="agent"), pytest.param("controller-rbac.yaml", id="controller")])
def test_bindings_refer_to_roles_and_service_accounts_defined(rbac_file):
    docs = _file(rbac_file)
    names = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert bindings
    for binding in bindings:
        ref = binding["roleRef"]
        assert ref["apiGroup"] == "rbac.authorization.k8s.io"
        assert (ref["kind"], binding["metadata"]["namespace"] if ref["kind"] == "Role" else None, ref["name"]) in names, ref
        assert (binding["kind"] == "RoleBinding") == (ref["kind"] == "Role"), "a ClusterRoleBinding to a Role does not exist"
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount"
            assert ("ServiceAccount", subject["namespace"], subject["name"]) in names, subject


@pytest.mark.parametrize("workload, kind, rbac_file", [
    pytest.param("agent-daemonset.yaml", "DaemonSet", "agent-rbac.yaml", id="agent"),
    pytest.param("controller-deployment.yaml", "Deployment", "controller-rbac.yaml", id="controller"),
])
def test_workload_service_account_exists_and_is_bound(workload, kind, rbac_file):
    namespace = _one(workload, kind)["metadata"]["namespace"]
    account = _pod_spec(workload, kind)["serviceAccountName"]
    accounts = [d for d in _file(rbac_file) if d["kind"] == "ServiceAccount"]
    assert [(a["metadata"]["namespace"], a["metadata"]["name"]) for a in accounts] == [(namespace, account)]
    assert rbac_grants(rbac_file, namespace, account)


def test_agent_is_read_only():
    verbs = {verb for _, rule in agent_grants() for verb in rule["verbs"]}
    assert verbs == READ_VERBS
    all_verbs = {verb for doc in _file("agent-rbac.yaml") for rule in doc.get("rules", ()) for verb in rule["verbs"]}
    assert all_verbs == READ_VERBS


def test_agent_reads_exactly_the_configmap_it_watches():
    namespace, name = _flag(_container("agent-daemonset.yaml", "DaemonSet"), "kube-configmap").split("/")
    grants = agent_grants()
    for verb in sorted(READ_VERBS):
        assert rbac_allows(grants, "", "configmaps", verb, namespace, name), verb
        assert not rbac_allows(grants, "", "configmaps", verb, namespace, "kube-proxy"), verb
        assert not rbac_allows(grants, "", "configmaps", verb, "default", name), verb
    assert all("resourceNames" in rule for _, rule in grants if "configmaps" in rule["resources"])


def test_agent_watches_egress_nat_policies():
    assert "--egress-nat-policies" in _container("agent-daemonset.yaml", "DaemonSet")["args"]
    for verb in ("list", "watch"):
        assert rbac_allows(agent_grants(), "networking.gke.io", "egressnatpolicies", verb)


@pytest.mark.parametrize("group, resource, verb, where", [
    pytest.param("", "configmaps", "get", "configmap", id="get-configmap"),
    pytest.param("", "configmaps", "update", "configmap", id="update-configmap"),
    pytest.param("", "configmaps", "create", "configmap-new", id="create-configmap"),
    pytest.param("coordination.k8s.io", "leases", "get", "lease", id="get-lease"),
    pytest.param("coordination.k8s.io", "leases", "update", "lease", id="update-lease"),
    pytest.param("coordination.k8s.io", "leases", "create", "lease-new", id="create-lease"),
    pytest.param("networking.gke.io", "egressnatpolicies", "list", None, id="list-policies"),
    pytest.param("networking.gke.io", "egressnatpolicies", "watch", None, id="watch-policies"),
    pytest.param("networking.gke.io", "egressnatpolicies", "create", None, id="create-policies"),
    pytest.param("networking.gke.io", "egressnatpolicies", "update", None, id="update-policies"),
    pytest.param("networking.gke.io", "egressnatpolicies/status", "update", None, id="update-policy-status"),
    pytest.param("networking.gke.io", "egressnatpolicies/status", "patch", None, id="patch-policy-status"),
    pytest.param("", "nodes", "list", None, id="list-nodes"),
    pytest.param("", "nodes", "watch", None, id="watch-nodes"),
])
def test_controller_may(group, resource, verb, where):
    container = _container("controller-deployment.yaml", "Deployment")
    namespace = name = None
    if where is not None:
        namespace, name = _flag(container, where.removesuffix("-new")).split("/")
        if where.endswith("-new"):
            name = None  # a create request carries no name for RBAC
    assert rbac_allows(controller_grants(), group, resource, verb, namespace, name)


def test_controller_writes_no_other_configmap_or_lease():
    grants = controller_grants()
    assert not rbac_allows(grants, "", "configmaps", "update", "kube-system", "kube-proxy")
    assert not rbac_allows(grants, "", "configmaps", "get", "kube-system", "kubeadm-config")
    assert not rbac_allows(grants, "coordination.k8s.io", "leases", "update", "kube-system", "kube-scheduler")
    assert not rbac_allows(grants, "", "configmaps", "create", "default")


# --- workloads -----------------------------------------------------------------------------------


def test_daemonset_is_unprivileged_with_net_admin_and_net_raw_only():
    pod = _pod_spec("agent-daemonset.yaml", "DaemonSet")
    assert pod["hostNetwork"] is True
    assert not pod.get("hostPID") and not pod.get("hostIPC")
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context.get("privileged", False) is False
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        assert sorted(context["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]


def test_daemonset_runs_on_every_node_as_node_critical():
    pod = _pod_spec("agent-daemonset.yaml", "DaemonSet")
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"], "a keyless, effectless Exists toleration tolerates every taint"


def test_daemonset_watches_the_configmap_and_does_not_also_mount_it():
    """The watch is the only source: with the file mounted too, a removed CIDR would stay until
    kubelet refreshed the copy (sources are unioned)."""
    pod = _pod_spec("agent-daemonset.yaml", "DaemonSet")
    namespace, name = _flag(_container("agent-daemonset.yaml", "DaemonSet"), "kube-configmap").split("/")
    configmap = _one("configmap.yaml", "ConfigMap")
    assert (configmap["metadata"]["namespace"], configmap["metadata"]["name"]) == (namespace, name)
    assert _one("agent-daemonset.yaml", "DaemonSet")["metadata"]["namespace"] == namespace
    assert [v for v in pod["volumes"] if "configMap" in v] == []


@pytest.mark.parametrize("name, kind", [
    pytest.param("agent-daemonset.yaml", "DaemonSet", id="agent"),
    pytest.param("controller-deployment.yaml", "Deployment", id="controller"),
])
def test_workload_has_modest_requests_and_a_memory_limit(name, kind):
    resources = _container(name, kind)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_controller_runs_two_replicas_without_privileges():
    deployment = _one("controller-deployment.yaml", "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "masqd-controller"
    assert not pod.get("hostNetwork")
    container = _container("controller-deployment.yaml", "Deployment")
    context = {**pod["securityContext"], **container["securityContext"]}
    assert context["runAsNonRoot"] is True
    assert context.get("runAsUser", 1) != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context.get("privileged", False) is False


def _run_flags(args: list[str]):
    from masqd.cli import build_parser, normalize_go_flags

    parser = build_parser()
    return parser.parse_args(normalize_go_flags(args, parser))


def test_agent_args_are_flags_masqd_run_takes():
    args = _container("agent-daemonset.yaml", "DaemonSet")["args"]
    assert args[0] == "run"
    flags = _run_flags(args)
    assert (flags.kube_configmap.namespace, flags.kube_configmap.name) == ("kube-system", "ip-masq-agent")
    assert flags.egress_nat_policies is True
    assert flags.config is None and flags.config_dir == []  # the API watch is the only source


def _commented_flags() -> list[str]:
    text = (EXAMPLES / "agent-daemonset.yaml").read_text()
    return re.findall(r"^\s*# - (--\S+)", text, flags=re.MULTILINE)


@pytest.mark.parametrize("flag", [pytest.param(f, id=f) for f in _commented_flags()])
def test_flags_suggested_in_the_daemonset_comments_exist(flag):
    _run_flags(["run", flag])


def test_controller_writes_the_configmap_the_agent_watches():
    agent = _flag(_container("agent-daemonset.yaml", "DaemonSet"), "kube-configmap")
    controller = _container("controller-deployment.yaml", "Deployment")
    assert _flag(controller, "configmap") == agent
    assert controller["args"][0] == "controller"
    ipaddress.ip_network(_flag(controller, "service-cidr"))


def test_controller_args_are_flags_masqd_controller_takes():
    flags = _run_flags(_container("controller-deployment.yaml", "Deployment")["args"])
    assert (str(flags.configmap), str(flags.lease)) == ("kube-system/ip-masq-agent", "kube-system/masqd-controller")
    assert [str(c) for c in flags.service_cidr] == ["10.96.0.0/12"]
    lease = _flag(_container("controller-deployment.yaml", "Deployment"), "lease")
    rules = [r for d in _file("controller-rbac.yaml") if d["kind"] in ("Role", "ClusterRole") for r in d["rules"]]
    assert any("leases" in r["resources"] and lease.split("/")[1] in r.get("resourceNames", []) for r in rules)


def test_configmap_holds_a_config_masqd_accepts_without_warnings():
    configmap = _one("configmap.yaml", "ConfigMap")
    assert set(configmap["data"]) == {"config"}
    parsed = parse_config(configmap["data"]["config"], AgentOptions(), source="configmap.yaml")
    assert parsed.warnings == ()
    assert [str(n) for n in parsed.config.non_masquerade_cidrs] == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]


# --- examples/decision-model: one ConfigMap per feature beyond upstream ----------------------------

DECISION_MODEL = REPO / "examples" / "decision-model"
DECISION_MODEL_FILES = sorted(DECISION_MODEL.glob("*.yaml"))
_UPSTREAM_ISSUE = re.compile(r"kubernetes-sigs/ip-masq-agent #[0-9]+")
#: The config keys beyond upstream's (docs/configuration.md, "Decision model").
_NEW_KEYS = {"masqueradeCIDRs", "masqueradeSourceCIDRs", "nonMasqueradeSourceCIDRs", "snatToAddress",
             "snatToAddressIPv6", "outputInterfaces"}


def _decision_config(name: str):
    (configmap,) = manifest_documents(DECISION_MODEL / name)
    return parse_config(configmap["data"]["config"], AgentOptions(), source=name)


def test_decision_model_examples_are_the_four_features_and_listed_in_the_readme():
    assert [p.name for p in DECISION_MODEL_FILES] == ["metadata-server.yaml", "output-interfaces.yaml",
                                                      "snat-to-address.yaml", "source-scoping.yaml"]
    readme = (REPO / "examples" / "README.md").read_text()
    for path in DECISION_MODEL_FILES:
        assert f"decision-model/{path.name}" in readme, f"examples/README.md does not mention {path.name}"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in DECISION_MODEL_FILES])
def test_decision_model_example_is_the_agents_configmap_accepted_without_warnings(path):
    (configmap,) = manifest_documents(path)
    assert (configmap["apiVersion"], configmap["kind"]) == ("v1", "ConfigMap")
    assert (configmap["metadata"]["namespace"], configmap["metadata"]["name"]) == ("kube-system", "ip-masq-agent")
    assert set(configmap["data"]) == {"config"}, "the agent reads the key 'config' and nothing else"
    assert parse_config(configmap["data"]["config"], AgentOptions(), source=path.name).warnings == ()
    header = " ".join(line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#"))
    assert _UPSTREAM_ISSUE.search(header), "the header names the upstream issues it answers"
    assert "upstream agent ignores" in header, "the header says what an upstream agent does with it"


def test_each_decision_model_example_sets_only_the_feature_it_is_named_for():
    """Beside upstream's keys, so that each can be read (and applied) on its own."""
    expected = {"metadata-server.yaml": {"masqueradeCIDRs"},
                "output-interfaces.yaml": {"outputInterfaces"},
                "snat-to-address.yaml": {"snatToAddress"},
                "source-scoping.yaml": {"masqueradeSourceCIDRs", "nonMasqueradeSourceCIDRs"}}
    assert {p.name: _decision_config(p.name).config.keys & _NEW_KEYS for p in DECISION_MODEL_FILES} == expected


@pytest.mark.parametrize("name, decisions, iptables, nft", [
    pytest.param("metadata-server.yaml", [
        (("169.254.169.254", None, None), True),  # the metadata server: the /32 is the longest match
        (("169.254.169.253", None, None), False),  # the rest of link-local keeps the pod address
        (("169.254.1.1", None, None), False),
        (("10.99.1.1", None, None), True),  # the peered network ...
        (("10.99.0.7", None, None), False),  # ... but for its /24 that routes pods back
        (("10.1.2.3", None, None), False),
        (("198.51.100.7", None, None), True),
    ], ["-d 169.254.169.252/31 ", "-d 169.254.169.255/32 ", "-d 10.98.0.0/16 ", "-d 10.99.0.0/24 ", "-d 10.100.0.0/14 "],
        ["169.254.169.252/31, 169.254.169.255/32", "10.98.0.0/16, 10.99.0.0/24, 10.100.0.0/14"],
        id="metadata-server"),
    pytest.param("source-scoping.yaml", [
        (("198.51.100.7", "10.244.1.5", None), True),  # a pod
        (("198.51.100.7", "10.244.241.5", None), False),  # a pod with a routable address
        (("198.51.100.7", "192.0.2.5", None), False),  # routed through the node, not a pod
        (("10.1.2.3", "10.244.1.5", None), False),  # a pod, to a kept destination
    ], ['-A IP-MASQ-AGENT -s 10.244.240.0/20 -m comment --comment "masqd: traffic from this source is not subject to '
        'MASQUERADE" -j RETURN', "-A IP-MASQ-AGENT -s 10.244.0.0/16 -m comment"],
        ["ip saddr 10.244.240.0/20 return", "ip saddr != 10.244.0.0/16 return"], id="source-scoping"),
    pytest.param("snat-to-address.yaml", [
        (("198.51.100.7", None, None), True),
        (("10.1.2.3", None, None), False),
    ], ["-j SNAT --to-source 192.0.2.10 --random-fully"], ["snat to 192.0.2.10 fully-random"], id="snat-to-address"),
    pytest.param("output-interfaces.yaml", [
        (("198.51.100.7", None, "eth0"), True),
        (("198.51.100.7", None, "eth0.100"), True),  # eth0.+: a VLAN sub-interface
        (("198.51.100.7", None, "eth1"), False),  # another interface: never masqueraded
        (("198.51.100.7", None, "eth01"), False),
        (("10.1.2.3", None, "eth0"), False),  # through the uplink the destination decides
    ], ["-A IP-MASQ-AGENT -o eth0 -m comment", "-A IP-MASQ-AGENT -o eth0.+ -m comment"],
        ['oifname "eth0" masquerade fully-random', 'oifname "eth0.*" masquerade fully-random'], id="output-interfaces"),
])
def test_decision_model_example_decides_what_its_comment_says(name, decisions, iptables, nft):
    from masqd.backends.iptables.render import render_ruleset as render_iptables
    from masqd.backends.nftables.render import render_ruleset as render_nft
    from masqd.ruleset import compute_ruleset

    ruleset = compute_ruleset(_decision_config(name).config, AgentOptions())
    for (destination, source, interface), masqueraded in decisions:
        source_address = None if source is None else ipaddress.ip_address(source)
        assert ruleset.decide(ipaddress.ip_address(destination), source_address, interface) == masqueraded, \
            (destination, source, interface)
    iptables_text, nft_text = render_iptables(ruleset), render_nft(ruleset)
    for text in iptables:
        assert text in iptables_text, text
    for text in nft:
        assert text in nft_text, text


# --- yamllint --------------------------------------------------------------------------------------


def _yamllint_config():
    try:
        from yamllint.config import YamlLintConfig
    except ImportError:  # pragma: no cover - the test extras install it
        pytest.fail("yamllint is not installed: it comes with the test extras (pip install '.[test]')")
    return YamlLintConfig(file=str(REPO / ".yamllint"))


def test_every_example_yaml_is_clean_under_the_repositorys_yamllint_config():
    """`yamllint examples/` from the repository root (its committed ``.yamllint``) finds nothing."""
    from yamllint import linter

    config = _yamllint_config()
    files = sorted(p for p in (REPO / "examples").rglob("*") if p.suffix in (".yaml", ".yml"))
    assert len(files) > 10
    findings = [f"{path.relative_to(REPO)}:{problem.line}:{problem.column}: {problem.desc} ({problem.rule})"
                for path in files for problem in linter.run(path.read_text(), config, str(path))]
    assert findings == []


def test_the_yamllint_config_still_finds_a_long_line_and_bad_indentation():
    from yamllint import linter

    text = "a:\n  b: " + "word " * 30 + "\nc:\n   - d\n  # comment\n"
    rules = {problem.rule for problem in linter.run(text, _yamllint_config())}
    assert {"line-length", "comments-indentation"} <= rules
