"""``python -m edgefed.cli``: the ``edgefed`` command without its entry-point script."""

from edgefed.cli.main import main

raise SystemExit(main())
