"""``edgefed agent``: run one edge agent against a broker."""

from __future__ import annotations

import argparse
import logging

from edge_agent.agent import run_agent
from edge_agent.config import AgentConfig
from edgefed.ml.models import set_torch_threads
from edgefed.process import run_until_stopped
from edgefed.settings import load_settings
from edgefed.transport.broker_choice import broker_for

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """Run the agent until it has sent ``--max-updates`` updates (or forever)."""
    config = load_settings(
        AgentConfig,
        args.config,
        federation=args.federation,
        client_id=args.client_id,
        data=args.data,
        max_updates=args.max_updates or None,
        state_dir=args.state_dir,
    )
    threads = set_torch_threads(config.torch_threads)
    log.info("%s: torch uses %d CPU thread(s)", config.client_id, threads)

    async def main() -> None:
        async with broker_for(config.mqtt.broker_url(args.broker), embedded=False) as url:
            report = await run_agent(config, url=url)
        methods = ", ".join(sorted(report.methods)) or "none this run"
        print(
            f"{report.client_id} ({methods}): {report.updates_sent} updates, {report.accepted} "
            f"accepted, rejected {dict(report.rejected)}, last version {report.last_version}"
        )

    run_until_stopped(main())
    return 0
