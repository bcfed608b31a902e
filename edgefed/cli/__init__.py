"""The ``edgefed`` command."""
