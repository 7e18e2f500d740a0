"""Result tables: ``<stem>.csv`` (full precision) and ``<stem>.md`` (4 significant digits)."""

from __future__ import annotations

import csv
import numbers
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["SEEDS_STD", "is_number", "mean_over_seeds", "write_table", "write_table_atomic"]

#: The suffix of a column's sample standard deviation over seeds (:func:`mean_over_seeds`).
#: :func:`write_table`'s Markdown shows ``<col>`` and ``<col>_seeds_std`` as one cell,
#: ``mean ± std``; the CSV keeps both columns at full precision.
SEEDS_STD = "_seeds_std"


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


def _group_value(values: list[Any]) -> dict[str, Any] | None:
    """A column's entry in a seed-aggregated row: an int the same in every row (a setting or a
    count) as it is, other numbers as mean and sample std, text the same in every row as it
    is; ``None`` (left out) for text that differs."""
    if all(is_number(v) for v in values):
        if all(isinstance(v, numbers.Integral) for v in values) and len(set(values)) == 1:
            return {"": values[0]}
        std = statistics.stdev(values) if len(values) > 1 else None
        return {"": statistics.fmean(values), SEEDS_STD: std}
    return {"": values[0]} if all(v == values[0] for v in values) else None


def mean_over_seeds(rows: Sequence[Mapping[str, Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """One row per distinct value of the ``by`` columns (first-seen order) from per-seed rows.

    Each row: the ``by`` columns; ``n_seeds``, the number of rows of the group; then, per
    column (a column a row lacks is left out of its statistics), for numbers the mean
    ``x̄ = Σ x_i / n`` and ``<col>_seeds_std``, the sample standard deviation
    ``s = √(Σ (x_i − x̄)² / (n − 1))`` (``None`` for ``n = 1``), except an integer equal in
    every row (a setting or a count, e.g. ``params``, ``steps``), which is kept as it is; text
    equal in every row is kept, other text dropped. The ``seed`` column itself is dropped.

    Parameters
    ----------
    rows : sequence of mapping
        Per-seed rows (one per seed and ``by`` value).
    by : sequence of str
        The columns that name a group (e.g. ``("model",)``, ``("model", "attack", "eps")``).

    Returns
    -------
    list of dict
        The aggregated rows.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r)
    out: list[dict[str, Any]] = []
    for key, members in groups.items():
        row: dict[str, Any] = {**dict(zip(by, key, strict=True)), "n_seeds": len(members)}
        cols: list[str] = []
        for r in members:
            cols += [k for k in r if k not in cols and k not in by and k != "seed"]
        for col in cols:
            entry = _group_value([r[col] for r in members if col in r])
            if entry is not None:
                row.update({col + suffix: v for suffix, v in entry.items()})
        out.append(row)
    return out


def _markdown_cells(row: Mapping[str, object], cols: list[str]) -> list[str]:
    """The Markdown cells of ``row``: ``mean ± std`` where ``<col>_seeds_std`` exists."""
    cells = []
    for k in cols:
        std = row.get(k + SEEDS_STD)
        cell = _fmt(row.get(k))
        cells.append(f"{cell} ± {float(std):.2g}" if is_number(std) else cell)  # type: ignore[arg-type]
    return cells


def write_table(rows: Sequence[Mapping[str, object]], path_stem: str | Path) -> str:
    """Write ``<stem>.csv`` (full precision) and ``<stem>.md`` (numbers to 4 significant digits);
    columns are the union of row keys in first-seen order. In the Markdown a column ``<col>``
    with a ``<col>_seeds_std`` column (:data:`SEEDS_STD`) is one cell ``mean ± std``.

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
    shown = [k for k in cols if not (k.endswith(SEEDS_STD) and k[: -len(SEEDS_STD)] in cols)]
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join(["---"] * len(shown)) + "|"]
    lines += ["| " + " | ".join(_markdown_cells(r, shown)) + " |" for r in rows]
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
