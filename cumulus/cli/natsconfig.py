"""`cumulus nats-config`: the config file of one nats-server of a fleet's NATS cluster.

An operator runs it once per server (docs/deploy.md) on the host that keeps the installation's
identities (`--auth-dir`), with the same `--peer` list each time, and copies each file to its
server: it holds public keys and permissions only, never a seed. `--cert`, `--key`, `--ca` and
`--store-dir` are paths on that server. Then `nats-server -c FILE` there. After new identities
(`cumulus users add`), write the files again and have every server reload (`kill -HUP <pid>`,
`systemctl reload`): the identities are in the file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cumulus.cli.exits import EXIT_OK, UsageError
from shared import cluster


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "nats-config",
        help="write one cluster nats-server's config (operator; docs/deploy.md)",
        description="The nats-server config of one server of a NATS cluster: routes to its "
        "peers, JetStream, the installation's identities, mutual TLS for clients and routes.",
    )
    p.add_argument("--name", required=True, help="this server's name, unique in the cluster")
    p.add_argument(
        "--listen",
        default=f"0.0.0.0:{cluster.CLIENT_PORT}",
        metavar="HOST:PORT",
        help=f"where clients connect (default 0.0.0.0:{cluster.CLIENT_PORT})",
    )
    p.add_argument(
        "--cluster",
        default=f"0.0.0.0:{cluster.ROUTE_PORT}",
        metavar="HOST:PORT",
        help=f"where the peers' routes connect (default 0.0.0.0:{cluster.ROUTE_PORT})",
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        required=True,
        metavar="HOST:PORT",
        help="a server's cluster address, this one's included (repeat: the same list everywhere)",
    )
    p.add_argument("--cluster-name", default=cluster.CLUSTER_NAME, help="the same on every server")
    p.add_argument("--store-dir", required=True, help="JetStream's store on this host")
    p.add_argument(
        "--auth-dir",
        metavar="DIR",
        help="the installation's identities (creds/*.json: `cumulus up`'s <data-dir>/auth)",
    )
    p.add_argument("--cert", help="this server's certificate (`cumulus certs issue --server`)")
    p.add_argument("--key", help="its key")
    p.add_argument("--ca", help="the CA of every client's and peer's certificate (ca.crt)")
    p.add_argument(
        "--monitor-port",
        type=int,
        default=cluster.MONITOR_PORT,
        help=f"HTTP monitoring on 127.0.0.1 (default {cluster.MONITOR_PORT}; 0: none)",
    )
    p.add_argument("--out", metavar="FILE", help="write here (0600) instead of standard output")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no identities and no TLS: for a cluster on loopback, to experiment",
    )


def _tls(args: argparse.Namespace) -> cluster.ServerTls | None:
    given = [args.cert, args.key, args.ca]
    if args.insecure and not any(given):
        return None
    if not all(given):
        raise UsageError("--cert, --key and --ca are needed together (or --insecure)")
    # Paths on the server's host, which need not be this one: not checked here.
    return cluster.ServerTls(
        cert=Path(args.cert).absolute(), key=Path(args.key).absolute(), ca=Path(args.ca).absolute()
    )


def _spec(args: argparse.Namespace) -> cluster.ServerSpec:
    host, port = cluster.split_address(args.listen, cluster.CLIENT_PORT)
    cluster_host, cluster_port = cluster.split_address(args.cluster, cluster.ROUTE_PORT)
    return cluster.ServerSpec(
        name=args.name,
        store_dir=Path(args.store_dir).absolute(),
        peers=tuple(args.peer),
        host=host,
        port=port,
        cluster_host=cluster_host,
        cluster_port=cluster_port,
        cluster_name=args.cluster_name,
        monitor_port=args.monitor_port,
    )


def nats_config(args: argparse.Namespace) -> int:
    """Write the config; a missing piece is a usage error naming the option."""
    if not args.auth_dir and not args.insecure:
        raise UsageError("--auth-dir is needed (the identities that may connect), or --insecure")
    authorization = cluster.authorization_of(Path(args.auth_dir)) if args.auth_dir else None
    text = cluster.render(cluster.server_config(_spec(args), authorization, _tls(args)))
    if not args.out:
        sys.stdout.write(text)
        return EXIT_OK
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.with_suffix(out.suffix + ".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(out.with_suffix(out.suffix + ".tmp"), out)
    print(
        f"nats-server config for {args.name}: {out} (start: nats-server -c {out})", file=sys.stderr
    )
    return EXIT_OK
