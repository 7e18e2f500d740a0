"""Reproducible experiments of the paper's claims, one module each.

Every experiment is ``run(out_dir, tiny=False, **options) -> list[dict]``: it writes its
table(s) with :func:`~poincare_resnet.evaluation.write_table` (``<name>.csv`` / ``.md``, extra
tables ``<name>_*.csv`` / ``.md``), a figure ``<name>.png`` and ``<name>_summary.json`` (the
headline numbers) into ``out_dir``. ``tiny=True`` shrinks every size for the test suite;
``threads`` sets the torch CPU threads for the run.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EXPERIMENTS", "experiment_options", "run_experiment"]

Runner = Callable[..., list[dict[str, Any]]]


def _runner(module: str) -> Runner:
    """``module.run``; its module is imported on first use (the memory probes start fresh
    interpreters that import this package, and should import little)."""

    def run(out_dir: str | Path, tiny: bool = False, **options: Any) -> list[dict[str, Any]]:
        return _load(module)(out_dir, tiny=tiny, **options)

    run.__doc__ = f"Run :func:`poincare_resnet.experiments.{module}.run`."
    return run


def _load(module: str) -> Runner:
    return importlib.import_module(f"{__name__}.{module}").run


MODULES = {
    "init-norms": "init_norms",
    "bn-speed": "bn_speed",
    "graph-memory": "graph_memory",
    "compare": "compare",
    "norm-free": "norm_free",
}
EXPERIMENTS: dict[str, Runner] = {name: _runner(module) for name, module in MODULES.items()}


def experiment_options(name: str) -> dict[str, Any]:
    """The options an experiment accepts and their defaults (``None``: depends on ``tiny``).

    Parameters
    ----------
    name : str
        An experiment of :data:`EXPERIMENTS`.

    Returns
    -------
    dict
        ``{option: default}`` of its ``run`` function's keyword-only options.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    params = inspect.signature(_load(MODULES[name])).parameters
    return {
        k: p.default
        for k, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "log"
    }


def run_experiment(
    name: str, out_dir: str | Path, tiny: bool = False, **options: Any
) -> list[dict[str, Any]]:
    """Run experiment ``name``; unknown options raise ``ValueError`` naming the accepted ones.

    Parameters
    ----------
    name : str
        An experiment of :data:`EXPERIMENTS`.
    out_dir : str or Path
        Where its outputs go.
    tiny : bool
        Tiny sizes.
    **options
        Options of its ``run`` function.

    Returns
    -------
    list of dict
        Its table rows.
    """
    accepted = experiment_options(name)
    unknown = sorted(set(options) - set(accepted) - {"log"})
    if unknown:
        raise ValueError(
            f"experiment {name} does not take {', '.join(unknown)}; its options are "
            f"{', '.join(accepted)}"
        )
    return EXPERIMENTS[name](out_dir, tiny=tiny, **options)
