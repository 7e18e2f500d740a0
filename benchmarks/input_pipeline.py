"""Input pipeline throughput: images per second from JPEG files on disk, 0, 1 and 2 workers.

Writes a Tiny-ImageNet-shaped tree into a temporary directory (``--images`` JPEGs of
``--size`` x ``--size``, quality 90, in ``--classes`` classes; smooth random images, whose JPEG
files are about the size of natural ones), loads it with
``load_dataset("tiny-imagenet", ..., image_size=--size)`` and, for each worker count, iterates
``--epochs`` epochs of the training loader (:class:`~poincare_resnet.data.DiskLoader`: decode
with Pillow, random-resized crop, flip, batch ``--batch-size``) as the trainer does, without a
model. Reported per worker count:

* ``images_per_s``: training images served per second over the timed epochs (worker start-up
  included: each epoch starts its workers, as in training);
* ``loader_ms_per_batch``: mean wall time the main process waits in ``next()`` for a batch. A
  train step is fed when this is below its step time (with workers, the decoding of the next
  batches overlaps the step, so the wait while training is at most this figure);
* ``first_batch_ms``: the wait for the first batch of an epoch (worker start-up + one batch).

The first epoch is a warm-up (page cache, imports) and is not timed. Prints a Markdown table
and writes the JSON to ``--json`` if given. Run alone on an idle machine, e.g.
``OMP_NUM_THREADS=1 python benchmarks/input_pipeline.py --json input_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poincare_resnet.data import DiskLoader, load_dataset  # noqa: E402


def write_tree(root: Path, images: int, classes: int, size: int, seed: int = 0) -> None:
    """A Tiny-ImageNet layout of ``images`` training JPEGs (and 1 val image per class)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    wnids = [f"n{k:08d}" for k in range(classes)]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rows = []

    def picture() -> Image.Image:
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth: upsampled 8 x 8 noise
        return Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)

    for i in range(images):
        folder = root / "train" / wnids[i % classes] / "images"
        folder.mkdir(parents=True, exist_ok=True)
        picture().save(folder / f"{wnids[i % classes]}_{i}.JPEG", quality=90)
    for k, wnid in enumerate(wnids):
        picture().save(root / "val" / "images" / f"val_{k}.JPEG", quality=90)
        rows.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t1\t1")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def measure(loader: DiskLoader, epochs: int) -> dict[str, float]:
    """Iterate ``epochs + 1`` epochs (the first untimed); the wait per batch and throughput."""
    waits: list[float] = []
    firsts: list[float] = []
    images = 0
    start = 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            start = time.perf_counter()
        loader.set_epoch(epoch)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                _, yb = next(it)
            except StopIteration:
                break
            if epoch:
                (firsts if loader.position == 1 else waits).append(time.perf_counter() - t0)
                images += len(yb)
    total = time.perf_counter() - start
    return {
        "images_per_s": images / total,
        "loader_ms_per_batch": 1e3 * float(np.mean(waits + firsts)),
        "steady_ms_per_batch": 1e3 * float(np.mean(waits)),
        "first_batch_ms": 1e3 * float(np.mean(firsts)),
        "batches": len(waits) + len(firsts),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:
        root = Path(tmp) / "tiny"
        t0 = time.perf_counter()
        write_tree(root, args.images, args.classes, args.size)
        written = time.perf_counter() - t0
        jpeg_bytes = sum(f.stat().st_size for f in (root / "train").rglob("*.JPEG"))
        data = load_dataset("tiny-imagenet", root, val_fraction=0.01, image_size=args.size)
        for workers in args.workers:
            loader = DiskLoader(
                data.train_x, data.train_y, args.batch_size, seed=0, workers=workers
            )
            rows.append({"workers": workers, **measure(loader, args.epochs)})
    result = {
        "benchmark": "input_pipeline",
        "images": len(data.train_y),
        "size": args.size,
        "batch_size": args.batch_size,
        "mean_jpeg_bytes": jpeg_bytes / args.images,
        "tree_written_s": written,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "rows": rows,
    }
    print(
        f"{result['images']} JPEGs {args.size}x{args.size} "
        f"({result['mean_jpeg_bytes']:.0f} B each), batch {args.batch_size}, "
        "random-resized crop + flip\n"
    )
    print("| workers | images/s | loader ms/batch | steady ms/batch | first batch ms |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['workers']} | {r['images_per_s']:.0f} | {r['loader_ms_per_batch']:.1f} | "
            f"{r['steady_ms_per_batch']:.1f} | {r['first_batch_ms']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
