"""Helpers shared by the experiments and the CLI: threads, option parsing, timing, figures,
probes, and the training recipe the experiments share."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..training.config import TrainConfig

Log = Callable[[str], None]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads (``None``: unchanged), then restore.

    Parameters
    ----------
    threads : int, optional
        Torch CPU threads inside the block (>= 1).

    Yields
    ------
    None
    """
    previous = torch.get_num_threads()
    if threads:
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def as_tuple(value: Any, cast: Callable[[Any], Any] = int) -> tuple:
    """``"8,20,32"``, ``8`` or ``[8, 20]`` → a tuple of ``cast`` values.

    Parameters
    ----------
    value : str, sequence or scalar
        A comma list, a sequence or one value.
    cast : callable
        Converts each item.

    Returns
    -------
    tuple
        At least one value (``ValueError`` naming ``value`` otherwise).
    """
    if isinstance(value, str):
        items: Sequence[Any] = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, Sequence):
        items = value
    else:
        items = [value]
    try:
        out = tuple(cast(v) for v in items)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot read {value!r} as a list: {e}") from e
    if not out:
        raise ValueError("expected at least one value")
    return out


def as_str_tuple(value: Any) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b"]`` → ``("a", "b")``.

    Parameters
    ----------
    value : str or sequence of str
        A comma list or a sequence.

    Returns
    -------
    tuple of str
    """
    return as_tuple(value, str)


def pick(value: Any, default: Any, tiny_default: Any, tiny: bool) -> Any:
    """``value`` if given, else the tiny or the full default.

    Parameters
    ----------
    value : Any
        The caller's value (``None``: not given).
    default, tiny_default : Any
        The full and the tiny default.
    tiny : bool
        Which default.

    Returns
    -------
    Any
    """
    if value is not None:
        return value
    return tiny_default if tiny else default


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time (``time.perf_counter``) of ``fn()`` over ``repeats`` calls, in seconds.

    Parameters
    ----------
    fn : callable
        What is timed.
    repeats : int
        Timed calls (at least one).
    warmup : int
        Untimed calls first.

    Returns
    -------
    float
        Seconds.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_graph_nodes(grad_fn: Any) -> int:
    """Number of autograd nodes reachable from ``grad_fn`` through ``next_functions``.

    Parameters
    ----------
    grad_fn : torch.autograd graph node
        A tensor's ``grad_fn``.

    Returns
    -------
    int
    """
    seen: set[int] = set()
    stack = [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(nxt for nxt, _ in getattr(node, "next_functions", ()))
    return len(seen)


def mean_tangent_norm(u: torch.Tensor, dim: int) -> float:
    """Mean Euclidean norm of the tangent vectors of ``u`` along ``dim``.

    Parameters
    ----------
    u : Tensor
        Tangent vectors.
    dim : int
        Their axis.

    Returns
    -------
    float
    """
    return float(torch.linalg.vector_norm(u.double(), dim=dim).mean())


def new_figure(ncols: int = 1, size: tuple[float, float] = (5.0, 4.0)) -> tuple[Figure, list]:
    """An off-screen figure with ``ncols`` axes side by side (pyplot is never touched).

    Parameters
    ----------
    ncols : int
        Axes side by side.
    size : tuple of float
        One axes' size in inches.

    Returns
    -------
    tuple
        ``(figure, axes list)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1]))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG, atomically (:func:`~.training.checkpoint.atomic_output`).

    Parameters
    ----------
    fig : Figure
        The figure.
    path : Path
        The PNG.

    Returns
    -------
    Path
        ``path``.
    """
    from ..training.checkpoint import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically.

    Parameters
    ----------
    path : Path
        The file.
    data : dict
        JSON-serialisable data (other values via ``str``).
    """
    from ..training.checkpoint import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def run_probe(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run :mod:`poincare_resnet.experiments._probe` on ``spec`` in a fresh Python process
    (so its peak-RSS measurement sees only that configuration) and return its JSON result.

    Parameters
    ----------
    spec : dict
        The probe's configuration (``kind``, sizes, ``device``, ``threads``, ...).
    timeout : float, optional
        Seconds before the probe is killed (``RuntimeError``).

    Returns
    -------
    dict
        The probe's measurements (``peak_mib``, ``method``, ...).
    """
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    threads = spec.get("threads") or torch.get_num_threads()
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "poincare_resnet.experiments._probe", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"memory probe {spec} timed out after {timeout} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe(
    kind: str,
    seed: int,
    device: str,
    threads: int | None,
    timeout: float | None,
    **fields: Any,
) -> dict[str, Any]:
    """:func:`run_probe` on the spec ``{"kind": kind, **fields, "seed", "device", "threads"}``.

    Parameters
    ----------
    kind : str
        The probe's kind (``"resnet_step"``).
    seed, device, threads
        Seed, device and torch CPU threads of the probe (``threads=None``: this process's
        current thread count).
    timeout : float, optional
        As in :func:`run_probe`.
    **fields
        The kind's sizes and options.

    Returns
    -------
    dict
        The probe's measurements.
    """
    threads = threads or torch.get_num_threads()
    spec = {"kind": kind, **fields, "seed": seed, "device": device, "threads": threads}
    return run_probe(spec, timeout)


@dataclass(frozen=True)
class TrainRecipe:
    """The training options an experiment applies to each of its runs.

    Parameters
    ----------
    dataset, data_dir, epochs, batch_size, lr, limit_train, seed, threads, device
        As the :class:`~poincare_resnet.training.TrainConfig` fields of the same names.
    """

    dataset: str
    data_dir: str | None
    epochs: int
    batch_size: int
    lr: float
    limit_train: int | None
    seed: int
    threads: int | None
    device: str

    def config(self, model: str, out: Path, **options: Any) -> TrainConfig:
        """The configuration of one quiet run of ``model`` into ``out`` (replaced if there).

        Parameters
        ----------
        model : str
            A registered model name.
        out : Path
            The run directory.
        **options
            Further :class:`~poincare_resnet.training.TrainConfig` fields.

        Returns
        -------
        TrainConfig
            The recipe with ``overwrite=True`` and ``progress=False``.
        """
        from ..training.config import TrainConfig

        return TrainConfig(
            model=model,
            **dataclasses.asdict(self),
            out=str(out),
            overwrite=True,
            progress=False,
            **options,
        )


def train_or_none(
    cfg: TrainConfig, log: Log, what: str, resume: str | None = None
) -> dict[str, Any] | None:
    """:func:`~poincare_resnet.training.train` without its log lines; ``None`` (and the log line
    ``"<what> diverged: ..."``) when it stops on a non-finite loss.

    Parameters
    ----------
    cfg : TrainConfig
        The run.
    log : callable
        Where the divergence is reported.
    what : str
        The run's name in that line.
    resume : str, optional
        Continue the run in this directory (its recipe is its ``config.json``'s).

    Returns
    -------
    dict or None
        The run's summary.
    """
    from ..training.trainer import NonFiniteError, train

    try:
        return train(cfg, resume=resume, log=lambda _m: None)
    except NonFiniteError as e:
        log(f"{what} diverged: {e}")
        return None


def _recipe(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg``'s options that say what the run is (not where it goes or how this process runs
    it), as JSON would store them."""
    from ..training.config import RUNTIME_OPTIONS

    skip = {*RUNTIME_OPTIONS, "out", "overwrite", "progress"}
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    return json.loads(json.dumps(options))


def same_recipe_run(cfg: TrainConfig) -> bool:
    """Whether ``cfg.out`` holds a run of exactly ``cfg``'s recipe (finished or not).

    Parameters
    ----------
    cfg : TrainConfig
        The run wanted.

    Returns
    -------
    bool
        ``True`` when ``cfg.out/config.json`` is readable and records the same options as
        ``cfg``, runtime options (threads, logging, ``max_steps``, ...) aside.
    """
    from ..training.rundir import RunDirError, load_run_config

    run = Path(cfg.out) if cfg.out else None
    if run is None or not (run / "config.json").is_file():
        return False
    try:
        return _recipe(load_run_config(run)) == _recipe(cfg)
    except (RunDirError, TypeError):
        return False


def train_or_reuse(cfg: TrainConfig, log: Log, what: str) -> dict[str, Any] | None:
    """The summary of the run ``cfg`` describes, training only what is missing.

    A finished run of the same recipe in ``cfg.out`` (:func:`same_recipe_run`, with its
    ``summary.json``) is reused as it is; an unfinished one is resumed from its last
    checkpoint; anything else there is replaced by a new run (:func:`train_or_none`).

    Parameters
    ----------
    cfg : TrainConfig
        The run (``out`` set; ``overwrite`` to replace another run there).
    log : callable
        Reuse, resumption and divergence are reported here.
    what : str
        The run's name in those lines.

    Returns
    -------
    dict or None
        The run's summary (``None``: it diverged).
    """
    run = Path(cfg.out or "")
    if same_recipe_run(cfg):
        summary = run / "summary.json"
        if summary.is_file():
            log(f"{what}: reusing the finished run {run}")
            return json.loads(summary.read_text(encoding="utf-8"))
        log(f"{what}: resuming the unfinished run {run}")
        return train_or_none(cfg, log, what, resume=str(run))
    return train_or_none(cfg, log, what)
