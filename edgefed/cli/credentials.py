"""``edgefed credentials``: CA, certificates and logins for a deployment (:mod:`edgefed.security`)."""

from __future__ import annotations

import argparse
import logging
import sys

from schemas.errors import ConfigError

log = logging.getLogger(__name__)

HELP = "CA, certificates, logins"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Secrets go to files, never to the terminal or the arguments."""
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


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def run(args: argparse.Namespace) -> int:
    """Carry out one ``edgefed credentials`` action; prints paths, never secrets."""
    # Imported only now (cryptography, torch for signing), so ``edgefed --help`` stays fast.
    from edgefed.security.credentials import (  # noqa: PLC0415
        AGGREGATOR,
        add_device,
        init_credentials,
        revoke_device,
        rotate_aggregator,
    )
    from edgefed.security.signing_rotation import rotate_signing_key, say_rotation  # noqa: PLC0415

    try:
        if args.action == "init":
            layout = init_credentials(
                args.dir,
                broker_hosts=args.broker_host,
                port=args.port,
                client_certs=args.client_certs,
                days=args.days,
            )
            _say(f"broker config:   {layout.broker_config}")
            _say(f"aggregator:      {layout.identity(AGGREGATOR)}")
            _say(f"signing key:     {layout.public_key} (public half, for devices)")
        elif args.action == "add-device":
            folder = add_device(
                args.dir,
                args.client_id,
                client_cert=args.client_cert,
                rotate=args.rotate,
                days=args.days,
            )
            _say(f"{args.client_id}: copy {folder} to the device; use its connection.toml")
        elif args.action == "rotate-aggregator":
            folder = rotate_aggregator(args.dir)
            _say(f"aggregator: new credentials in {folder}; reload the broker (SIGHUP)")
        elif args.action == "rotate-signing-key":
            say_rotation(rotate_signing_key(args.dir, finish=args.finish), _say)
        else:
            revoke_device(args.dir, args.client_id)
            _say(f"{args.client_id}: revoked; reload the broker (SIGHUP) or restart for CRLs")
    except ConfigError as exc:
        log.error("%s", exc)  # noqa: TRY400 (the message says it all)
        return 1
    return 0
