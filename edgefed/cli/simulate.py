"""``edgefed simulate``: a simulated fleet of agents and an aggregator against a real broker."""

from __future__ import annotations

import argparse

from edgefed.cli.options import broker_option, max_payload_option

HELP = "run a fleet of agents and an aggregator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``edgefed simulate``, in groups for ``--help``."""
    broker_option(parser)
    max_payload_option(parser)
    _fleet_options(parser)
    _method_options(parser)
    _merge_options(parser)


def _fleet_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fleet", "the devices: how many, which model, their data")
    group.add_argument("--model", default="tiny")
    group.add_argument("--agents", type=int, default=4)
    group.add_argument(
        "--fleet",
        default=None,
        help="fleet spec TOML (simulator/fleets/*.toml): devices, data, strategy, target; "
        "replaces the fleet flags",
    )
    group.add_argument(
        "--dataset", default="synthetic", help="synthetic, rotten-tomatoes, sst2, ag-news, ..."
    )
    group.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "size"])
    group.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    group.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="text: rows of the train split the devices share (default 1,600; 0 = all)",
    )
    group.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="text: held-out rows of the test split the aggregator scores (default 500; "
        "AG News has 7,600)",
    )
    group.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="score every Nth version (default 1; 0 = never): a large held-out set costs "
        "the devices' CPU",
    )
    group.add_argument("--seed", type=int, default=0)


def _method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("methods", "what each device trains")
    group.add_argument("--method", default="lora", choices=["lora", "fwdgrad", "kd", "split"])
    group.add_argument(
        "--methods", default="", help="per-agent methods, cycled, e.g. lora,fwdgrad (mixed fleet)"
    )
    group.add_argument(
        "--budgets",
        default="",
        help="per-agent memory budgets in MB, cycled, e.g. 3000,1200: each agent plans its "
        "method (among --method and --methods) and step shape to fit",
    )
    group.add_argument(
        "--cuts", default="", help="split: per-agent cuts (device blocks), cycled, e.g. 1,2"
    )
    group.add_argument(
        "--variant", default="vanilla", choices=["vanilla", "u_shaped"], help="split variant"
    )
    group.add_argument(
        "--device-models", default="", help="kd: per-agent device models, cycled (tiny,tiny-4l)"
    )
    group.add_argument("--lora-mode", default="standard", choices=["standard", "ffa"])


def _merge_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("merging", "how the aggregator merges and when the run ends")
    group.add_argument(
        "--mode",
        default="async",
        choices=["async", "sync", "both"],
        help="async merging, synchronous FedAvg rounds, or both on one chart",
    )
    group.add_argument("--strategy", default="fedbuff", choices=["fedbuff", "fedasync"])
    group.add_argument("--staleness", default=None, help="constant|polynomial|hinge")
    group.add_argument("--max-versions", type=int, default=20)
    group.add_argument(
        "--max-seconds", type=float, default=0.0, help="stop merging after S seconds (0 = no)"
    )
    group.add_argument(
        "--clients-per-round", type=int, default=None, help="sync: devices sampled per round"
    )
    group.add_argument(
        "--round-deadline",
        type=float,
        default=None,
        help="sync: close a round after S simulated seconds with whoever arrived",
    )
    group.add_argument("--json-out", default=None, help="results file")


def run(args: argparse.Namespace) -> int:
    """Imported only now, so ``edgefed --help`` stays fast."""
    from simulator import cli  # noqa: PLC0415

    return cli.run(args)
