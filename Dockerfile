# syntax=docker/dockerfile:1
#
# masqd container image: `docker build -t ghcr.io/masqd/masqd:0.1.0 .`
#
# Two stages from the same base (the venv built in the first is copied verbatim into the second,
# so its interpreter path must exist there too). The base is Debian 12 (bookworm), the release the
# test suite runs on: the same iptables 1.8.9 and nftables 1.0.6, at the same paths, as
# tests/test_netns_capabilities.py gives capabilities to.
#
# The image runs as a non-root user (uid 65532) with no capabilities of its own. The iptables,
# nft and conntrack binaries carry file capabilities (cap_net_admin,cap_net_raw+ep), so masqd's child processes
# get exactly those two when the pod allows them. The pod must therefore:
#   - add NET_ADMIN and NET_RAW (drop ALL else): a binary whose file capabilities are not all in
#     the bounding set fails to start at all (execve returns EPERM);
#   - NOT set allowPrivilegeEscalation: false: that sets no_new_privs, under which the kernel
#     ignores file capabilities, and every iptables/nft call fails with "you must be root".
# Nodes that use legacy (x_tables) iptables need the agent to run as root (runAsUser: 0, still
# with only those two capabilities): see examples/kubernetes/README.md, "Container image and
# capabilities".

FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package needs (see .dockerignore): the metadata, the readme it names, the code.
COPY pyproject.toml README.md ./
COPY masqd/ masqd/

# A venv without pip or setuptools: the runtime needs neither (plugins are added with
# `pip --python /opt/masqd/bin/python install ...`, see examples/kubernetes/README.md).
# pip builds masqd's wheel and installs it with its dependencies, byte-compiled, so a read-only
# root filesystem costs nothing at start-up.
RUN python -m venv --without-pip /opt/masqd \
 && pip --python /opt/masqd/bin/python install --no-cache-dir --compile /src


FROM python:3.11-slim-bookworm

ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="masqd" \
      org.opencontainers.image.description="IP masquerade agent for Kubernetes nodes: a drop-in ip-masq-agent with an event-driven core" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/masqd/masqd" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# iptables (both variants: xtables-nft-multi and xtables-legacy-multi) and nft from Debian,
# pinned to the upstream versions the tests run (Debian revisions, i.e. security fixes, float).
# libcap2-bin provides setcap, and getcap for checking a running image. conntrack: masqd, without
# CAP_NET_ADMIN of its own, reads and prunes live flows through it (--conntrack-reconcile).
#
# setcap gives the real files (the iptables*, ip6tables* and nft commands are symlinks to these
# three) exactly NET_ADMIN (change the nat table) and NET_RAW (legacy iptables talks to the kernel
# through a raw socket), permitted and effective. The loop then checks that every command masqd
# runs resolves to a file that carries them, so a Debian layout change fails the build instead of
# the pod.
#
# The user is created with a fixed uid/gid, 65532 (as distroless' nonroot), no home, no shell.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        'iptables=1.8.9-*' \
        'nftables=1.0.6-*' \
        'libcap2-bin=1:2.66-*' \
        'conntrack=1:1.4.7-*' \
 && rm -rf /var/lib/apt/lists/* \
 && setcap cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-nft-multi \
           cap_net_admin,cap_net_raw+ep /usr/sbin/xtables-legacy-multi \
           cap_net_admin,cap_net_raw+ep /usr/sbin/nft \
           cap_net_admin,cap_net_raw+ep /usr/sbin/conntrack \
 && for tool in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore \
                iptables-nft iptables-nft-save iptables-nft-restore \
                ip6tables-nft ip6tables-nft-save ip6tables-nft-restore \
                iptables-legacy iptables-legacy-save iptables-legacy-restore \
                ip6tables-legacy ip6tables-legacy-save ip6tables-legacy-restore nft conntrack; do \
        getcap "$(readlink -f "$(command -v "$tool")")" | grep -F 'cap_net_admin,cap_net_raw=ep' >/dev/null \
            || { echo "$tool: no file capabilities" >&2; exit 1; }; \
    done \
 && groupadd --system --gid 65532 masqd \
 && useradd --system --no-log-init --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin masqd

COPY --from=build /opt/masqd /opt/masqd

ENV PATH="/opt/masqd/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# /metrics, /healthz and /readyz (--http-address, default :9142). With hostNetwork this port is
# opened on the node itself.
EXPOSE 9142/tcp

USER 65532:65532

# `docker run IMAGE` is `masqd run`; any other arguments replace `run`
# (`docker run IMAGE validate --config ...`). Kubernetes' `command`/`args` replace these two.
ENTRYPOINT ["masqd"]
CMD ["run"]
