"""Readers for the deployment files (``Dockerfile``, ``examples/``) shared by the tests that check
them: ``test_deploy.py`` (the files themselves), ``test_examples.py`` (the Kubernetes manifests),
``test_netns_capabilities.py`` (the Dockerfile's capability model against the real kernel) and
``test_controller.py`` (every request the controller and the agent make, against the shipped RBAC).

Each reader returns exactly what the file says, so a test that takes its inputs from here fails
when the file drifts: the kernel test gives the binaries the capabilities the Dockerfile's
``setcap`` gives them, runs as the Dockerfile's ``USER``, and so on.
"""

from __future__ import annotations

import configparser
import inspect
import json
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

import masqd
from masqd.backends.iptables_mode import binaries_for

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
EXAMPLES = REPO / "examples"
KUBERNETES = EXAMPLES / "kubernetes"
EDGE_UNIT = EXAMPLES / "edge" / "masqd.service"
IMAGE = f"ghcr.io/masqd/masqd:{masqd.__version__}"


# --- Dockerfile -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instruction:
    """One Dockerfile instruction: ``keyword`` upper-cased, ``args`` with continuations joined,
    ``stage`` the index of the ``FROM`` it belongs to (0 for the first stage)."""

    keyword: str
    args: str
    stage: int


def dockerfile_instructions(text: str | None = None) -> list[Instruction]:
    """The instructions of the Dockerfile (or of ``text``), comments and parser directives left
    out, continuation lines joined as Docker joins them."""
    text = DOCKERFILE.read_text() if text is None else text
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # Docker drops comment lines, inside a continuation too
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        logical.append((pending + raw).strip())
        pending = ""
    if pending.strip():
        logical.append(pending.strip())
    instructions, stage = [], -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, " ".join(args.split()), max(stage, 0)))
    return instructions


def final_stage() -> list[Instruction]:
    instructions = dockerfile_instructions()
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def _commands(run_args: str) -> list[list[str]]:
    """The simple commands of a RUN line split on ``&&`` (enough for the Dockerfile's own style)."""
    return [shlex.split(part) for part in run_args.split("&&") if part.strip()]


def setcap_grants() -> dict[str, str]:
    """``{path: capability text}`` for every file the final stage runs ``setcap`` on, e.g.
    ``{"/usr/sbin/nft": "cap_net_admin,cap_net_raw+ep"}`` (setcap takes caps/file pairs)."""
    grants: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.keyword != "RUN":
            continue
        for command in _commands(instruction.args):
            if command[:1] == ["setcap"]:
                pairs = command[1:]
                assert len(pairs) % 2 == 0, f"setcap needs capability/file pairs: {command}"
                grants.update({path: caps for caps, path in zip(pairs[::2], pairs[1::2])})
    return grants


def parse_caps(text: str) -> tuple[frozenset[str], str]:
    """``cap_net_admin,cap_net_raw+ep`` -> ({"NET_ADMIN", "NET_RAW"}, "ep")."""
    names, op, flags = text.partition("+") if "+" in text else text.partition("=")
    assert op, f"no +flags or =flags in {text!r}"
    return frozenset(name.strip().removeprefix("cap_").upper() for name in names.split(",")), flags


def image_capabilities() -> frozenset[str]:
    """The capabilities the image's binaries carry (Kubernetes spelling: NET_ADMIN), which must
    be the same for every capped file."""
    caps = {parse_caps(text) for text in setcap_grants().values()}
    assert len(caps) == 1, f"the binaries carry different capabilities: {caps}"
    (names, flags), = caps
    assert set(flags) == {"e", "p"}, f"file capabilities must be permitted and effective (+ep): {flags!r}"
    return names


def verified_tools() -> list[str]:
    """The commands the final stage checks for file capabilities (``for tool in ...; do``)."""
    for instruction in final_stage():
        if instruction.keyword == "RUN" and "for tool in" in instruction.args:
            words = instruction.args.split("for tool in", 1)[1].split(";", 1)[0]
            return words.split()
    return []


def image_user() -> tuple[int, int]:
    """``(uid, gid)`` of the final stage's last ``USER`` (numeric, as the image declares it)."""
    (user,) = [i.args for i in final_stage() if i.keyword == "USER"][-1:]
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def exec_form(keyword: str) -> list[str]:
    """The JSON (exec) form of the final stage's ENTRYPOINT or CMD."""
    (args,) = [i.args for i in final_stage() if i.keyword == keyword][-1:]
    return json.loads(args)


# --- what masqd runs -------------------------------------------------------------------------------


def masqd_tools() -> list[str]:
    """Every command name masqd's backends may run: each iptables variant's save, restore and
    main binary for IPv4 and IPv6, nft, and conntrack (live flows, when masqd's own socket is refused)."""
    names = {getattr(b, field) for mode in ("system", "legacy", "nft") for b in binaries_for(mode).values()
             for field in ("save", "restore", "main")}
    from masqd.backends import nftables

    executor = getattr(nftables, "NftSubprocessExecutor", None)
    names.add(inspect.signature(executor).parameters["binary"].default if executor else "nft")
    from masqd.backends.conntrack.table import ConntrackTable

    names.add(inspect.signature(ConntrackTable).parameters["tool"].default)
    return sorted(names)


# --- the systemd unit -----------------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    """``examples/edge/masqd.service`` as an ini file (systemd's syntax is a superset for what the
    unit uses; keys keep their case)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment]
    parser.read_string(EDGE_UNIT.read_text())
    return parser


def unit_exec_start() -> list[str]:
    return shlex.split(unit()["Service"]["ExecStart"])


def unit_capabilities(key: str) -> frozenset[str]:
    """``AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW`` -> {"NET_ADMIN", "NET_RAW"}."""
    return frozenset(word.removeprefix("CAP_") for word in unit()["Service"][key].split())


# --- Kubernetes manifests -------------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """safe_load_all, but a mapping with a key given twice is an error: PyYAML keeps the last
    value silently, and so would a reader of the file (two ``args:`` in one container...)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@cache
def manifest_documents(path: Path) -> tuple[dict, ...]:
    """The YAML documents of a manifest (empty ones left out), read with :class:`StrictLoader`."""
    return tuple(doc for doc in yaml.load_all(path.read_text(), Loader=StrictLoader) if doc is not None)


def manifest_object(path: Path, kind: str) -> dict:
    """The one object of ``kind`` in the manifest at ``path``."""
    (doc,) = [d for d in manifest_documents(path) if d["kind"] == kind]
    return doc


def rbac_grants(rbac_file: str, namespace: str, service_account: str) -> list[tuple[str | None, dict]]:
    """(namespace the rule applies in, or None for cluster-wide; rule) for every rule bound to
    the service account by a binding in ``examples/kubernetes/RBAC_FILE``."""
    docs = manifest_documents(KUBERNETES / rbac_file)
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")}
    grants = []
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if {"kind": "ServiceAccount", "name": service_account, "namespace": namespace} not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        scope = binding["metadata"].get("namespace")
        role = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        grants += [(scope, rule) for rule in role["rules"]]
    return grants


def rbac_allows(grants, group: str, resource: str, verb: str, namespace: str | None = None,
                name: str | None = None) -> bool:
    """What the RBAC authorizer decides for one request (no wildcards: test_examples refuses them)."""
    for scope, rule in grants:
        if scope is not None and scope != namespace:
            continue
        if group not in rule["apiGroups"] or resource not in rule["resources"] or verb not in rule["verbs"]:
            continue
        if "resourceNames" in rule and name not in rule["resourceNames"]:
            continue
        return True
    return False


def _workload_grants(rbac_file: str, workload_file: str, kind: str) -> list[tuple[str | None, dict]]:
    workload = manifest_object(KUBERNETES / workload_file, kind)
    account = workload["spec"]["template"]["spec"]["serviceAccountName"]
    return rbac_grants(rbac_file, workload["metadata"]["namespace"], account)


def agent_grants() -> list[tuple[str | None, dict]]:
    """What the shipped RBAC grants the service account of the agent's DaemonSet."""
    return _workload_grants("agent-rbac.yaml", "agent-daemonset.yaml", "DaemonSet")


def controller_grants() -> list[tuple[str | None, dict]]:
    """What the shipped RBAC grants the service account of the controller's Deployment."""
    return _workload_grants("controller-rbac.yaml", "controller-deployment.yaml", "Deployment")
