"""`cumulus download JOB [PATH] [-o DIR]`: a job's kept `outputs/` folder, unpacked.

What a job leaves in `outputs/` (in its working directory) is kept when it ends, up to
`worker.max_output_bytes`, for `retention.results_ttl_s`; this unpacks all of it, or the one
file or folder PATH, into DIR (default: the current directory) and prints each file written.
"""

from __future__ import annotations

import argparse
import json

from cumulus import AsyncClient
from cumulus.cli.exits import EXIT_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "download",
        help="a job's kept outputs/ folder, unpacked here (or in -o DIR)",
        description="Unpack what the job left in its outputs/ folder (kept when it ended).",
    )
    p.add_argument("job_id", help="the job (its id, or a unique prefix of it)")
    p.add_argument(
        "path", nargs="?", help="one file or folder inside outputs/ (default: all of it)"
    )
    p.add_argument(
        "-o", "--output", default=".", metavar="DIR", help="where to unpack (default: here)"
    )
    p.add_argument("--json", action="store_true", help="print the files written as JSON")


async def download(args: argparse.Namespace) -> int:
    async with AsyncClient(args.url, args.user, profile=args.profile) as client:
        files = await client.get_job(args.job_id).download(args.path, args.output)
    if args.json:
        print(json.dumps({"files": [str(f) for f in files]}))
    else:
        for file in files:
            print(file)
    return EXIT_OK
