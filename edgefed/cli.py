"""The ``edgefed`` command: one sub-command per part of the product.

Each sub-command's work lives in its own module and is imported only when that
sub-command runs, so ``edgefed --help`` stays fast (torch is not imported).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

_HANDLERS = {
    "broker": "edgefed.broker",
    "bench": "edgefed.bench",
    "agent": "edge_agent.cli",
    "aggregator": "aggregator.cli",
    "simulate": "simulator.cli",
    "demo": "simulator.demo",
}


def _broker_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        default=None,
        help="broker URL, mqtt://host:port or mqtts://host:port; default: 127.0.0.1:1883 "
        "when something answers there, else an embedded broker started for this run",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar, in one place."""
    parser = argparse.ArgumentParser(prog="edgefed", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    broker = commands.add_parser("broker", help="run a development MQTT broker")
    broker.add_argument("--port", type=int, default=1883)
    broker.add_argument("--host", default="127.0.0.1")
    broker.add_argument(
        "--embedded", action="store_true", help="use the embedded broker even if mosquitto exists"
    )

    bench = commands.add_parser("bench", help="micro-benchmarks, reported as ratios")
    bench.add_argument("which", choices=["codec"])
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--repeat", type=int, default=0, help="repetitions per size (0 = auto)")

    agent = commands.add_parser("agent", help="run an edge agent")
    _broker_option(agent)
    agent.add_argument("--federation", required=True)
    agent.add_argument("--client-id", required=True)
    agent.add_argument("--data", required=True, help="a data file, or synthetic:KEY=VALUE,...")
    agent.add_argument("--config", default=None, help="agent TOML file")
    agent.add_argument(
        "--max-updates", type=int, default=0, help="stop after N updates (0 = run on)"
    )

    aggregator = commands.add_parser("aggregator", help="run the aggregator")
    _broker_option(aggregator)
    aggregator.add_argument("--federation", required=True)
    aggregator.add_argument("--config", default=None, help="aggregator TOML file")
    aggregator.add_argument(
        "--max-versions", type=int, default=0, help="stop at version V (0 = run on)"
    )
    aggregator.add_argument("--json-out", default=None, help="results file")

    simulate = commands.add_parser("simulate", help="run a fleet of agents and an aggregator")
    _broker_option(simulate)
    simulate.add_argument("--model", default="tiny")
    simulate.add_argument("--agents", type=int, default=4)
    simulate.add_argument("--method", default="lora", choices=["lora"])
    simulate.add_argument("--strategy", default="fedbuff", choices=["fedbuff", "fedasync"])
    simulate.add_argument("--staleness", default=None, help="constant|polynomial|hinge")
    simulate.add_argument("--lora-mode", default="standard", choices=["standard", "ffa"])
    simulate.add_argument("--max-versions", type=int, default=20)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--json-out", default=None, help="results file")

    demo = commands.add_parser("demo", help="the main job: a small simulated federation")
    _broker_option(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgefed`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(_HANDLERS[args.command])
    code: int = module.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
