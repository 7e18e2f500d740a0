"""The run directory: naming it, refusing to overwrite what this tool did not write, and the
``config.json`` that marks it as a run of this tool.

``config.json`` carries the marker ``"tool": "poincare-resnet"`` and a ``format_version``;
``--overwrite`` replaces only such a directory, deleting only the files this tool writes there,
and refuses (before deleting anything) a directory that holds anything else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

from torch import nn

from .checkpoint import atomic_write_text
from .config import ABSENT_RUN_OPTIONS, TrainConfig

# config.json's marker: a directory is a run of this tool (and --overwrite may replace it) only
# when its config.json says so. Format 2: the marker and the resolved ``model_config``.
TOOL = "poincare-resnet"
RUN_FORMAT_VERSION = 2
# what a run directory of this tool holds: files at its top, and per subdirectory a pattern
_RUN_FILES = frozenset(
    {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "report.md",
        "training_curves.png",
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.json",
        "compare_eval.json",  # experiment compare's cached evaluation of the run
    }
)
_RUN_SUBDIRS = {
    "checkpoints": re.compile(r"ckpt-\d+\.(safetensors|json)"),
    "ood": re.compile(r"ood\.(csv|md)|(roc|hist)_\w+\.png"),
    "attack": re.compile(r"attack\.(csv|md)|accuracy_vs_eps\.png"),
    "explain": re.compile(r"explanations\.(csv|md|png)"),
}
# a temporary file of checkpoint.atomic_stem left by a crash: .<stem>.<16 hex>.tmp<suffix>
_TMP_FILE = re.compile(r"\.(?P<stem>.+)\.[0-9a-f]{16}\.tmp(?P<suffix>\.\w+)?")


class RunDirError(ValueError):
    """The output directory cannot be used (holds another run, or no run to resume)."""


def _default_out(cfg: TrainConfig) -> str:
    return str(Path("runs") / f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def _is_tool_file(name: str, known) -> bool:
    """``name`` is a file this tool writes (``known(name)``) or an atomic write's leftover."""
    if known(name):
        return True
    m = _TMP_FILE.fullmatch(name)
    return bool(m) and known(m["stem"] + (m["suffix"] or ""))


def _foreign_entries(run: Path) -> list[str]:
    """Entries of run directory ``run`` that this tool does not write there (links count)."""
    foreign = []
    for entry in sorted(run.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_dir():
            pattern = _RUN_SUBDIRS.get(entry.name)
            if pattern is None:
                foreign.append(entry.name + "/")
                continue
            foreign += [
                f"{entry.name}/{sub.name}"
                for sub in sorted(entry.iterdir())
                if sub.is_symlink()
                or not sub.is_file()
                or not _is_tool_file(sub.name, pattern.fullmatch)
            ]
        elif not entry.is_file() or not _is_tool_file(entry.name, _RUN_FILES.__contains__):
            foreign.append(entry.name)
    return foreign


def _not_a_run(run: Path) -> str | None:
    """Why ``run`` is not a run directory written by this tool (``None`` if it is)."""
    config = run / "config.json"
    if config.is_symlink() or not config.is_file():
        return "it holds no config.json written by poincare-resnet"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its config.json is unreadable ({exc})"
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        return (
            f'its config.json has no "tool": "{TOOL}" marker (not written by this tool, '
            "or by a version before the marker)"
        )
    return None


def check_replaceable(run: Path) -> None:
    """Raise :class:`RunDirError` unless ``--overwrite`` may replace directory ``run``: its
    ``config.json`` carries this tool's marker and it holds nothing this tool did not write.

    Parameters
    ----------
    run : Path
        The directory ``--overwrite`` would replace.
    """
    why = _not_a_run(run)
    if why is None:
        foreign = _foreign_entries(run)
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if foreign[5:] else ""
            )
            why = f"it holds files poincare-resnet did not write ({shown})"
    if why is not None:
        raise RunDirError(
            f"refusing to --overwrite {run}: {why}; nothing was deleted. Remove it yourself or "
            "choose another --out"
        )


def remove_run_files(run: Path) -> None:
    """Delete the files this tool wrote in run directory ``run`` (after :func:`check_replaceable`
    passes again), then its subdirectories that are left empty; ``run`` itself is kept.

    Parameters
    ----------
    run : Path
        A run directory of this tool.
    """
    check_replaceable(run)
    for entry in sorted(run.iterdir()):
        if entry.is_dir():
            for sub in sorted(entry.iterdir()):
                sub.unlink()
            entry.rmdir()
        else:
            entry.unlink()


def prepare_run_dir(cfg: TrainConfig, resume: str | None) -> Path:
    """Create (or check) the run directory without touching another run's files.

    Parameters
    ----------
    cfg : TrainConfig
        ``out`` (default ``runs/<model>-<dataset>-<time>``) and ``overwrite``.
    resume : str, optional
        A run directory to continue (must hold ``config.json``).

    Returns
    -------
    Path
        The run directory (created later, by rank 0, in :func:`start_run_dir`).
    """
    if resume:
        run = Path(resume)
        if not (run / "config.json").is_file():
            raise RunDirError(f"--resume {run}: no config.json there; not a poincare-resnet run")
        return run
    run = Path(cfg.out or _default_out(cfg))
    if run.exists() and not run.is_dir():
        raise RunDirError(f"output directory {run} exists and is not a directory")
    if run.exists() and any(run.iterdir()):
        if not cfg.overwrite:
            raise RunDirError(
                f"output directory {run} already holds files (another run?); pass --resume {run} "
                f"to continue it, --overwrite to replace it, or choose another --out"
            )
        check_replaceable(run)
    check_output_dir(run)
    return run


def check_output_dir(path: str | os.PathLike[str], what: str = "output directory") -> None:
    """Raise :class:`RunDirError` unless directory ``path`` exists or can be created: no
    component is a file and the nearest existing directory is writable. Creates nothing.

    Parameters
    ----------
    path : str or PathLike
        The directory.
    what : str
        Its name in the error message.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise RunDirError(f"{what} {path} exists and is not a directory")
        existing = path
    else:
        existing = next((p for p in path.parents if p.exists()), Path("."))
        if not existing.is_dir():
            raise RunDirError(f"cannot create {what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write {what} {path}: {existing} is not writable")


def start_run_dir(run: Path, cfg: TrainConfig, model: nn.Module) -> None:
    """Rank 0, new run: replace the old run (``--overwrite``), create ``run``, write
    ``config.json`` (the options, this tool's marker and the resolved model config).

    Parameters
    ----------
    run : Path
        The new run's directory (created if missing).
    cfg : TrainConfig
        The options ``config.json`` records.
    model : nn.Module
        The built network (its ``model_name`` and ``model_config``).
    """
    if cfg.overwrite and run.is_dir():
        remove_run_files(run)
    run.mkdir(parents=True, exist_ok=True)
    config = {
        "tool": TOOL,
        "format_version": RUN_FORMAT_VERSION,
        **dataclasses.asdict(cfg),
        "model_name": model.model_name,
        "model_config": model.model_config,
    }
    atomic_write_text(run / "config.json", json.dumps(config, indent=2))


def load_run_config(run: Path) -> TrainConfig:
    """The options stored in ``run/config.json``; :class:`RunDirError` if it is unreadable.

    Parameters
    ----------
    run : Path
        A run directory.

    Returns
    -------
    TrainConfig
        Its options (keys that are not fields, such as the marker, are left out; an option
        the file predates takes the value :data:`~.config.ABSENT_RUN_OPTIONS` gives it).
    """
    try:
        data = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{run / 'config.json'} is unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise RunDirError(f"{run / 'config.json'} does not hold a JSON object")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**ABSENT_RUN_OPTIONS, **{k: v for k, v in data.items() if k in known}})
