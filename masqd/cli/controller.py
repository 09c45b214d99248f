"""``masqd controller``: the cluster controller translating EgressNATPolicy objects into the
agents' ConfigMap. It loads no plugins and none of the agent's rule flags apply to it."""

from __future__ import annotations

import argparse

from masqd.cli.common import EXIT_OK
from masqd.kube.settings import KubeSettings


async def controller_command(args: argparse.Namespace) -> int:
    from masqd.controller.loop import run_controller
    from masqd.controller.options import ControllerOptions
    from masqd.kube.client import load_kube_config  # the API client library: imported by this command only

    settings = KubeSettings(kubeconfig=args.kubeconfig)
    load_kube_config(settings.kubeconfig)  # no credentials: a start-up error (exit 2), not a retry loop
    options = ControllerOptions(configmap=args.configmap, lease=args.lease, service_cidrs=tuple(args.service_cidr),
                                node_cidrs=tuple(args.node_cidr), enable_ipv6=args.enable_ipv6)
    await run_controller(options, settings)
    return EXIT_OK
