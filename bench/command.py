"""``edgefed bench``: which benchmark runs; each is imported only when asked for.

Every benchmark reports ratios to a baseline measured side by side in the same run, and
``--save`` keeps its figures in RESULTS.md beside this package (docs/architecture.md §11).
"""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    """Entry point of ``edgefed bench``; returns the process exit code."""
    # Each import loads models or brokers, so only the one asked for is imported.
    if args.which == "codec":
        from bench import codec  # noqa: PLC0415

        return codec.run(args)
    if args.which == "estimate":
        from bench import estimate  # noqa: PLC0415

        return estimate.run(args)
    if args.which in ("scale", "throughput", "merge", "seed", "all"):
        from bench import suite  # noqa: PLC0415

        return suite.run(args)
    if args.which in ("memory", "bytes", "fwdgrad"):
        from bench import fwdgrad  # noqa: PLC0415

        return fwdgrad.run(args)
    if args.which == "split":
        from bench import split  # noqa: PLC0415

        return split.run(args)
    if args.which == "hierarchy":
        from bench import hierarchy  # noqa: PLC0415

        return hierarchy.run(args)
    if args.which == "kd":
        from bench import kd  # noqa: PLC0415

        return kd.run(args)
    sys.stderr.write(f"unknown benchmark {args.which!r}\n")
    return 2
