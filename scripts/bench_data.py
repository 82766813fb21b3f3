"""Per-worker throughput of the data pipelines on real JPEGs, beside torchvision's classic PIL equivalents.

    python scripts/bench_data.py [--images DIR] [--reps N] [--json FILE]

One process, torch.set_num_threads(1): the figures are images/s of one DataLoader worker. Ours decodes with
`load_image` and transforms uint8 tensors (normalization happens later, batched on the device); torchvision's
baseline opens with PIL, transforms PIL images and ends with ToTensor + Normalize, as its ImageNet example.
Each pipeline gets one warm-up pass over all images, then `reps` timed pairs of passes, ours and torchvision's
back to back (order alternating per pair). The table shows the best pass of each side (the least disturbed by
other load) and the median over pairs of the ratio ours/torchvision, which stays fair when the machine's load
drifts; the best/best ratio beside it should agree when the machine is quiet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PIL
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TVF

from repro.bench import cpu_model
from repro.data.images import is_image_file, load_image
from repro.data.transforms import EvalViews, RandomResizedCrop, ScaleAugCrop

DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenet-sample"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

Pipeline = Callable[[str], Any]


def list_images(root: Path) -> list[str]:
    """All image files under `root`, sorted; exits with a clear message when there are none."""
    if not root.is_dir():
        sys.exit(f"bench_data: image folder {str(root)!r} not found; pass --images DIR (a folder of JPEGs, e.g. "
                 f"the imagenet-sample of ../shared/data beside the checkout)")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True) for f in files
                   if is_image_file(f))
    if not paths:
        sys.exit(f"bench_data: no image files under {str(root)!r}; pass --images DIR")
    return paths


def pil_rgb(path: str) -> Image.Image:
    """torchvision's ImageFolder loader: PIL open + convert('RGB')."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def pipelines() -> dict[str, tuple[Pipeline, Pipeline, tuple[int, ...]]]:
    """{name: (ours, torchvision, expected output shape)}; the shape is checked on the warm-up pass."""
    norm = T.Normalize(MEAN, STD)
    center, ten = EvalViews(protocols=["center"], resize=256, crop=224), EvalViews(protocols=["ten_crop"])
    scale_aug, rrc = ScaleAugCrop(), RandomResizedCrop()
    tv_center = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])
    tv_ten = T.Compose([T.Resize(256), T.TenCrop(224),
                        T.Lambda(lambda crops: torch.stack([norm(TVF.to_tensor(c)) for c in crops]))])
    tv_scale_aug = T.Compose([T.Lambda(lambda im: T.Resize(random.randint(256, 480))(im)), T.RandomCrop(224),
                              T.RandomHorizontalFlip(), T.ToTensor(), norm])
    tv_rrc = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return {
        "decode": (load_image, pil_rgb, ()),
        "eval center": (lambda p: center(load_image(p), p)["center"], lambda p: tv_center(pil_rgb(p)),
                        (1, 3, 224, 224)),
        "eval ten_crop": (lambda p: ten(load_image(p), p)["ten_crop"], lambda p: tv_ten(pil_rgb(p)),
                          (10, 3, 224, 224)),
        "train scale-aug": (lambda p: scale_aug(load_image(p)), lambda p: tv_scale_aug(pil_rgb(p)), (3, 224, 224)),
        "train inception": (lambda p: rrc(load_image(p)), lambda p: tv_rrc(pil_rgb(p)), (3, 224, 224)),
    }


def one_pass(fn: Pipeline, paths: list[str]) -> float:
    """Images/s of one pass of `fn` over all `paths`."""
    t0 = time.perf_counter()
    for p in paths:
        fn(p)
    return len(paths) / (time.perf_counter() - t0)


def check_shapes(name: str, ours: Pipeline, tv: Pipeline, shape: tuple[int, ...], paths: list[str]) -> None:
    """Warm-up pass that also checks both sides produce the same view shape (ours uint8, theirs float)."""
    for p in paths:
        a, b = ours(p), tv(p)
        if not shape:  # decode: [3, H, W] against a PIL (W, H) image
            got, want = (tuple(a.shape), a.dtype), ((3, *b.size[::-1]), torch.uint8)
        else:  # ours keeps the view dimension of a single center view ([1, 3, h, w]), torchvision does not
            got = (tuple(a.shape), a.dtype, b.numel(), b.dtype)
            want = (shape, torch.uint8, a.numel(), torch.float32)
        if got != want:
            raise RuntimeError(f"{name}: {p} gives {got}, expected {want}")


def machine_info() -> dict[str, str]:
    """What the figures depend on: CPU, library versions, JPEG library."""
    from PIL import features

    turbo = features.check_feature("libjpeg_turbo")
    jpeg = f"libjpeg-turbo {features.version('libjpeg_turbo')}" if turbo else f"libjpeg {features.version('jpg')}"
    return {"cpu": cpu_model(), "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__,
            "pillow_jpeg": jpeg, "torch_threads": str(torch.get_num_threads())}


def bench(paths: list[str], reps: int) -> dict[str, dict[str, Any]]:
    """Time every pipeline, ours and torchvision's interleaved; returns per-pass images/s and summaries."""
    results: dict[str, dict[str, Any]] = {}
    for name, (ours, tv, shape) in pipelines().items():
        check_shapes(name, ours, tv, shape, paths)
        runs: dict[str, list[float]] = {"ours": [], "torchvision": []}
        for r in range(reps):
            order = [("ours", ours), ("torchvision", tv)]
            for side, fn in order if r % 2 == 0 else order[::-1]:
                runs[side].append(one_pass(fn, paths))
        med = {k: statistics.median(v) for k, v in runs.items()}
        best = {k: max(v) for k, v in runs.items()}
        pair_ratio = statistics.median(a / b for a, b in zip(runs["ours"], runs["torchvision"]))
        results[name] = {"ours_best": best["ours"], "torchvision_best": best["torchvision"],
                         "ratio_paired_median": pair_ratio, "ratio_best": best["ours"] / best["torchvision"],
                         "ours_median": med["ours"], "torchvision_median": med["torchvision"], "passes": runs}
        print(f"  {name}: done", file=sys.stderr, flush=True)
    return results


def table(results: dict[str, dict[str, Any]]) -> str:
    """The figures as a fixed-width table (images/s per worker: best pass; ratios: paired median, best/best)."""
    head = f"{'pipeline':<17} {'ours img/s':>11} {'tv img/s':>9} {'ours/tv':>8} {'best/best':>10}"
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        rows.append(f"{name:<17} {r['ours_best']:>11.1f} {r['torchvision_best']:>9.1f} "
                    f"{r['ratio_paired_median']:>7.2f}x {r['ratio_best']:>9.2f}x")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark, print the table (and write JSON when asked)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of images (searched recursively)")
    ap.add_argument("--reps", type=int, default=6, help="timed passes over all images, per pipeline and side")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    paths = list_images(args.images)
    torch.set_num_threads(1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    info = machine_info()
    load_before = os.getloadavg()[0]
    print(f"bench_data: {len(paths)} images from {args.images}, {args.reps} timed passes each "
          f"(+1 warm-up), 1 thread", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    results = bench(paths, args.reps)
    elapsed = time.perf_counter() - t0
    info["loadavg_1min"] = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print(f"Data pipeline throughput per worker (1 process, 1 thread), {len(paths)} images from {args.images}")
    print("  " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"  {args.reps} timed passes per side after a warm-up pass, {elapsed:.0f} s; img/s: best pass; ours/tv: "
          f"median of paired ratios. Ours outputs uint8 views (normalized later on the device), torchvision "
          f"float32 normalized tensors.")
    if load_before > 0.5:
        print(f"  warning: the machine was busy (load {load_before:.2f}); the absolute img/s are pessimistic, the "
              f"paired ratios less so")
    print()
    print(table(results))
    if args.json is not None:
        payload = {"images": str(args.images), "num_images": len(paths), "reps": args.reps, "seed": args.seed,
                   "machine": info, "elapsed_s": elapsed, "unit": "images/s per worker", "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
