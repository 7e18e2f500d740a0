"""Command-line interface: ``poincare-resnet {train, evaluate, models, ood, attack, explain,
experiment, embed}``. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2), without the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    """argparse ``type``: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _positive_float(text: str) -> float:
    """argparse ``type``: a finite float ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text!r}")
    return value


_POSITIVE = _int_at_least(1)
_NONNEGATIVE = _int_at_least(0)


def _kv_pairs(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs (values parsed as JSON where possible) for ``--model-kwargs``."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--model-kwargs expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        if not key:
            raise ValueError(f"--model-kwargs expects key=value, got {item!r} (empty key)")
        if key in out:
            raise ValueError(f"--model-kwargs gives {key!r} twice")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _add_train(sub) -> None:
    from .training.config import LOGGERS, NO_DECAY, OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a model (default: Poincaré ResNet-20 on digits)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="TOML, YAML or JSON file of options (a run's config.json repeats it); flags given "
        "on the command line override it",
    )
    p.add_argument("--model", default=d.model, help="registered name (see `models`)")
    p.add_argument(
        "--dataset",
        default=d.dataset,
        help="digits | fashion-mnist | cifar10 | cifar100 (in memory) | imagefolder | "
        "tiny-imagenet | imagenet (image files on disk, need --data-dir)",
    )
    p.add_argument("--data-dir", default=None, help="where the dataset files are")
    p.add_argument(
        "--image-size",
        type=_POSITIVE,
        default=None,
        help="on-disk datasets: train/eval image size (default 64 for tiny-imagenet, else 224)",
    )
    p.add_argument(
        "--workers",
        type=_NONNEGATIVE,
        default=None,
        help="on-disk datasets: image-decoding processes (default min(2, cores); 0 = none)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="global batch size (split over processes under torchrun)",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--no-decay",
        choices=NO_DECAY,
        default=d.no_decay,
        help="parameters without weight decay: standard = curvatures, norm weights, biases; "
        "curvature = curvatures only; none = every parameter decays (runs before this option)",
    )
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--step-size", type=int, default=d.step_size, help="epochs per step decay")
    p.add_argument("--gamma", type=float, default=d.gamma, help="step decay factor")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 = off")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="autocast for convolutions; hyperbolic maths stays float32",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument(
        "--no-augment", dest="augment", action="store_false", help="no random crop / flip"
    )
    p.add_argument("--limit-train", type=int, default=None, help="use N training images")
    p.add_argument("--out", default=None, help="run directory (default runs/<model>-<data>-<time>)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument(
        "--ckpt-every-steps",
        type=int,
        default=d.ckpt_every_steps,
        help="also checkpoint every N steps (0: each epoch only)",
    )
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument(
        "--log",
        choices=LOGGERS,
        default=d.log,
        help="also log to TensorBoard (<out>/tensorboard); metrics.jsonl is always written",
    )
    p.add_argument("--nan-policy", choices=("stop", "skip"), default=d.nan_policy)
    p.add_argument("--sync-bn", action="store_true", help="synchronise batch norm across ranks")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (testing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_key_values(p, "--model-kwargs", "extra model options, e.g. init=center bn_mean=frechet")


def _add_key_values(p, flag: str, help_: str) -> None:
    """An option taking any number of ``KEY=VALUE`` words (read by :func:`_kv_pairs`)."""
    p.add_argument(flag, nargs="*", default=[], metavar="KEY=VALUE", help=help_)


def _cmd_train(args) -> int:
    from .training.trainer import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["progress"] = not args.no_progress
    values["model_kwargs"] = _kv_pairs(args.model_kwargs)
    if args.config:
        from .training.config_file import explicit_train_fields, load_config_file, merge_config

        given = explicit_train_fields(getattr(args, "argv", None) or sys.argv[1:])
        values = merge_config(load_config_file(args.config), values, given)
    cfg = TrainConfig(**values)
    summary = train(cfg, resume=args.resume)
    if summary:
        print(
            json.dumps(
                {k: summary[k] for k in ("test_top1", "test_top5", "best_val_top1", "run_dir")},
                indent=2,
            )
        )
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy, confusion matrix")
    p.add_argument("checkpoint", help="a .safetensors checkpoint or a run directory")
    p.add_argument("--dataset", default=None, help="default: the one it was trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="directory for evaluation.json and the PNG")


def _cmd_evaluate(args) -> int:
    from .api import evaluate_checkpoint

    res = evaluate_checkpoint(
        args.checkpoint, args.dataset, args.data_dir, args.split, args.device, args.out
    )
    print(json.dumps(res, indent=2))
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list registered model names")
    p.add_argument("pattern", nargs="?", default=None, help="shell pattern, e.g. '*20*'")


def _cmd_models(args) -> int:
    from .models import list_models

    print("\n".join(list_models(args.pattern)))
    return 0


def _checkpoint_parser(sub, name: str, help_: str, several: bool = False):
    """The parser of a command on one checkpoint (``several``: one or more) or run directory."""
    p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if several:
        p.add_argument("checkpoints", nargs="+", help="checkpoints or run directories")
    else:
        p.add_argument("checkpoint", help="a .safetensors checkpoint or a run directory")
    return p


def _checkpoint_kwargs(args) -> dict:
    """The keyword arguments of ``run_ood`` / ``run_attack`` that their options share."""
    return {
        "data_dir": args.data_dir,
        "device": args.device,
        "dataset": args.dataset,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }


def _add_checkpoint_options(p, name: str, several: bool = False) -> None:
    """The options the ``ood``, ``attack`` and ``explain`` commands share, in this order:
    ``--dataset --data-dir --device [--batch-size] --threads --out`` (default
    ``<run dir>/name``)."""
    they = "they were" if several else "it was"
    p.add_argument("--dataset", default=None, help=f"default: the one {they} trained on")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    if not several:
        p.add_argument("--batch-size", type=_POSITIVE, default=256)
    p.add_argument("--threads", type=_POSITIVE, default=None, help="torch CPU threads")
    run_dir = "<first run dir>" if several else "<run dir>"
    p.add_argument("--out", default=None, help=f"output directory (default: {run_dir}/{name})")


def _checkpoint_command_out(args, checkpoint: str, name: str):
    """Set ``--threads``; the output directory: ``--out``, else ``name`` in the checkpoint's
    run directory."""
    from pathlib import Path

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ck = Path(checkpoint)
    return Path(args.out) if args.out else (ck if ck.is_dir() else ck.parent) / name


def _print_table(out, table: str, written) -> int:
    """Print the command's Markdown table and where its files went; exit code 0."""
    print((out / table).read_text(), end="")
    print(f"\nwritten to {written}")
    return 0


def _add_ood(sub) -> None:
    p = _checkpoint_parser(sub, "ood", "OOD detection: test set vs synthetic sets or image folders")
    p.add_argument(
        "--ood-sets",
        default="gaussian,uniform,digits",
        help="comma list of builtin sets (gaussian, uniform, inverted, hflip, vflip, digits) "
        "and/or paths (image directory or CIFAR-format file)",
    )
    p.add_argument("--scores", default="energy,msp,feature_norm", help="comma list")
    p.add_argument("--repeats", type=_POSITIVE, default=5, help="random subsamples to average over")
    p.add_argument("--subsample", type=_POSITIVE, default=None, help="samples per set per repeat")
    p.add_argument("--seed", type=_NONNEGATIVE, default=0)
    _add_checkpoint_options(p, "ood")


def _cmd_ood(args) -> int:
    from .evaluation.commands import run_ood
    from .experiments.common import as_str_tuple

    out = _checkpoint_command_out(args, args.checkpoint, "ood")
    run_ood(
        args.checkpoint,
        list(as_str_tuple(args.ood_sets)),
        out=out,
        scores=as_str_tuple(args.scores),
        repeats=args.repeats,
        subsample=args.subsample,
        **_checkpoint_kwargs(args),
    )
    return _print_table(out, "ood.md", out)


def _add_attack(sub) -> None:
    from .evaluation.commands import ROBUSTNESS_ATTACKS, ROBUSTNESS_STEPS
    from .evaluation.square_attack import SQUARE_QUERIES

    p = _checkpoint_parser(sub, "attack", "robustness table: attacks, worst case, zero gradients")
    p.add_argument(
        "--attacks",
        "--attack",
        dest="attack",
        metavar="LIST",
        default=",".join(ROBUSTNESS_ATTACKS),
        help="comma list: fgsm, pgd, pgd-margin, square, angular",
    )
    p.add_argument(
        "--eps",
        default="0.8,1.6,2.4,3.2",
        help="comma list of L∞ radii in /255 units of the [-1, 1] input range",
    )
    p.add_argument("--steps", type=_POSITIVE, default=ROBUSTNESS_STEPS, help="PGD / angular steps")
    p.add_argument(
        "--step-size",
        type=_positive_float,
        default=None,
        help="PGD / angular step in /255 units (default 2.5·ε/steps)",
    )
    p.add_argument("--no-random-start", action="store_true", help="PGD starts at the image")
    p.add_argument("--restarts", type=_POSITIVE, default=1, help="random restarts of PGD / angular")
    p.add_argument(
        "--queries", type=_POSITIVE, default=SQUARE_QUERIES, help="Square attack queries per image"
    )
    p.add_argument(
        "--source",
        default=None,
        help="transfer attack: craft the examples on this run (same data), evaluate on RUN",
    )
    p.add_argument("--limit", type=_POSITIVE, default=None, help="attack N random test images")
    p.add_argument("--seed", type=_NONNEGATIVE, default=0)
    _add_checkpoint_options(p, "attack")


def _cmd_attack(args) -> int:
    from .evaluation.commands import run_attack
    from .experiments.common import as_str_tuple, as_tuple

    out = _checkpoint_command_out(args, args.checkpoint, "attack")
    eps = [e / 255.0 for e in as_tuple(args.eps, float)]
    if not all(math.isfinite(e) and e >= 0 for e in eps):
        raise ValueError(f"--eps values must be finite and >= 0, got {args.eps!r}")
    run_attack(
        args.checkpoint,
        attacks=as_str_tuple(args.attack),
        eps=eps,
        steps=args.steps,
        step_size=None if args.step_size is None else args.step_size / 255.0,
        random_start=not args.no_random_start,
        limit=args.limit,
        out=out,
        restarts=args.restarts,
        queries=args.queries,
        source=args.source,
        **_checkpoint_kwargs(args),
    )
    return _print_table(out, "robustness.md", out)


def _add_explain(sub) -> None:
    help_ = "Grad-CAM and saliency maps of one or more models, side by side"
    p = _checkpoint_parser(sub, "explain", help_, several=True)
    p.add_argument("--images", default="0,1,2,3", help="comma list of test-set indices")
    _add_checkpoint_options(p, "explain", several=True)


def _cmd_explain(args) -> int:
    from .evaluation.commands import run_explain
    from .experiments.common import as_tuple

    out = _checkpoint_command_out(args, args.checkpoints[0], "explain")
    run_explain(
        args.checkpoints,
        images=list(as_tuple(args.images)),
        out=out,
        data_dir=args.data_dir,
        device=args.device,
        dataset=args.dataset,
    )
    return _print_table(out, "explanations.md", out / "explanations.png")


def _add_experiment(sub) -> None:
    from .experiments import EXPERIMENTS

    p = sub.add_parser(
        "experiment",
        help="run one of the paper's experiments (tables + figure)",
        description="Experiments: " + ", ".join(EXPERIMENTS) + ". Options an experiment does "
        "not take are rejected; --set KEY=VALUE passes any other option of its run() function.",
    )
    p.add_argument("name", choices=list(EXPERIMENTS))
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds; for tests)")
    p.add_argument("--out", default=None, help="output directory (default results/<name>)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--seeds", default=None, help="compare: comma list of seeds, e.g. 0,1,2 (mean ± std)"
    )
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--depths", default=None, help="comma list, e.g. 8,20,32")
    p.add_argument("--repeats", type=int, default=None)
    _add_key_values(p, "--set", "any other option, e.g. --set widths=8,16 memory=false")


def _cmd_experiment(args) -> int:
    from pathlib import Path

    from .experiments import run_experiment

    flags = (
        "threads",
        "device",
        "seed",
        "seeds",
        "dataset",
        "data_dir",
        "epochs",
        "batch_size",
        "lr",
        "limit_train",
        "depths",
        "repeats",
    )
    options = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            options[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.replace("-", "_")] = value
    out = Path(args.out) if args.out else Path("results") / args.name
    run_experiment(args.name, out, tiny=args.tiny, **options)
    slug = args.name.replace("-", "_")
    for md in sorted(out.glob(f"{slug}*.md")):
        print(f"\n## {md.stem}\n")
        print(md.read_text(), end="")
    print(f"\nwritten to {out}")
    return 0


def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="pooled test features on the Poincaré disk, by class (PNG + CSV); runs side by side",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", help="run directories or checkpoints (RUN [RUN_B])")
    p.add_argument("--ood-set", default=None, help="builtin OOD set or image directory to overlay")
    p.add_argument("--center", choices=("frechet", "origin"), default="frechet",
                   help="tangent PCA at the Fréchet mean or at the origin")  # fmt: skip
    p.add_argument("--limit", type=int, default=2000, help="embed N random test images (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output directory (default: <first run>/embed)")


def _cmd_embed(args) -> int:
    from pathlib import Path

    from .evaluation.embed import run_embed

    ck = Path(args.checkpoints[0])
    out = Path(args.out) if args.out else (ck if ck.is_dir() else ck.parent) / "embed"
    results = run_embed(
        args.checkpoints,
        out,
        ood_set=args.ood_set,
        limit=args.limit or None,
        seed=args.seed,
        center=args.center,
        data_dir=args.data_dir,
        device=args.device,
    )
    for r in results:
        means = ", ".join(f"{k} {v:.3f}" for k, v in r["mean_dist_to_origin"].items())
        print(f"{r['run']}: mean distance to the origin per class: {means}")
    print(f"written to {out / 'embedding.png'} and {out / 'embedding.csv'}")
    return 0


COMMANDS = {
    "train": (_add_train, _cmd_train),
    "evaluate": (_add_evaluate, _cmd_evaluate),
    "models": (_add_models, _cmd_models),
    "ood": (_add_ood, _cmd_ood),
    "attack": (_add_attack, _cmd_attack),
    "explain": (_add_explain, _cmd_explain),
    "experiment": (_add_experiment, _cmd_experiment),
    "embed": (_add_embed, _cmd_embed),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``poincare-resnet`` command line.

    Returns
    -------
    argparse.ArgumentParser
        The parser of every command (``train``, ``evaluate``, ``ood``, ``attack``, ...).
    """
    parser = _Parser(
        prog="poincare-resnet",
        description="Train and evaluate fully hyperbolic (Poincaré) ResNets.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command of the CLI.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit code: 0 done, 2 bad input (one line naming it), 3 training diverged.
    """
    from .training.checkpoint import CheckpointError
    from .training.trainer import NonFiniteError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad option (one line on stderr), --help or --version
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for train --config
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return COMMANDS[args.command][1](args)
    except NonFiniteError as e:
        _error(e)
        return EXIT_NONFINITE
    except (ValueError, CheckpointError, OSError) as e:
        # bad input: options, data files, checkpoints, output directories (OSError: missing,
        # unreadable or unwritable paths). One line naming the problem, no traceback.
        _error(e)
        return EXIT_BAD_INPUT


def _error(e: BaseException) -> None:
    """``poincare-resnet: error: <message>`` on one line of stderr."""
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"poincare-resnet: error: {message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
