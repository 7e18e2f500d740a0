"""Result tables: ``<stem>.csv`` (full precision) and ``<stem>.md`` (4 significant digits)."""

from __future__ import annotations

import csv
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["is_number", "write_table", "write_table_atomic"]


def is_number(v: object) -> bool:
    """Whether ``v`` is a real number (not a ``bool``).

    Parameters
    ----------
    v : object
        Any value.

    Returns
    -------
    bool
        True for ints, floats and NumPy scalars other than booleans.
    """
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fmt(v: object) -> str:
    """A Markdown cell: integers as they are, reals to 4 significant digits, text escaped."""
    if is_number(v):
        if isinstance(v, numbers.Integral):
            return str(int(v))
        return f"{float(v):.4g}"  # type: ignore[arg-type]
    return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")


def write_table(rows: Sequence[Mapping[str, object]], path_stem: str | Path) -> str:
    """Write ``<stem>.csv`` (full precision) and ``<stem>.md`` (numbers to 4 significant digits);
    columns are the union of row keys in first-seen order.

    Parameters
    ----------
    rows : sequence of mapping
        The table's rows; a missing key is an empty cell.
    path_stem : str or Path
        The files' path without suffix (parent directories are created).

    Returns
    -------
    str
        The Markdown text.
    """
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{stem}.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in cols})
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    with open(f"{stem}.md", "w", encoding="utf-8") as fh:
        fh.write(md)
    return md


def write_table_atomic(rows: Sequence[Mapping[str, Any]], stem: str | Path) -> str:
    """:func:`write_table`, each file replaced atomically
    (:func:`~poincare_resnet.training.checkpoint.atomic_stem`).

    Parameters
    ----------
    rows : sequence of mapping
        The table's rows.
    stem : str or Path
        The files' path without suffix.

    Returns
    -------
    str
        The Markdown text.
    """
    from ..training.checkpoint import atomic_stem

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with atomic_stem(stem, (".csv", ".md")) as tmp:
        return write_table(rows, tmp)
