"""RESULTS.md is written by several benchmarks: each owns one marked block of it."""

from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, start: str, end: str, block: str) -> None:
    """Put ``block`` between the ``start`` and ``end`` markers of ``path``, or at its end.

    ``block`` carries the markers itself; everything else in the file stays as it is.
    """
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
