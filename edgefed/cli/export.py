"""``edgefed export``: a version of a federation's adapter as a PEFT folder."""

from __future__ import annotations

import argparse

HELP = "write a kept global of an aggregator's checkpoint as a PEFT adapter folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed export``."""
    parser.add_argument(
        "--checkpoint-dir", required=True, help="the aggregator's checkpoint_dir (read only)"
    )
    parser.add_argument(
        "--version",
        type=int,
        default=None,
        help="the global to export (default: the latest; the checkpoint keeps the last "
        "max_staleness + 1)",
    )
    parser.add_argument("--out", required=True, help="the folder to write (new, or an adapter)")


def run(args: argparse.Namespace) -> int:
    """Imported only now: building the model needs torch."""
    from aggregator.adapter_folder import export_version  # noqa: PLC0415

    info = export_version(args.checkpoint_dir, args.out, args.version)
    print(
        f"wrote version {info.version} of {info.federation} (run {info.run_id}) to {args.out}; "
        f"its base model is {info.base.model.name!r}: PeftModel.from_pretrained(base, {args.out!r})"
    )
    return 0
