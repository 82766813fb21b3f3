"""`evaluate`: a model scored under the papers' test protocols (batched crops, exact top-1/top-5 counts).

repro-train and repro-eval both call it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from repro.data import DataError, Normalize
from repro.distributed import Dist, all_reduce_sum, gather_objects

AVERAGES = ("softmax", "logits")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")  # of evaluation: fp32 = full fp32 (TF32 off on CUDA)
MAX_VIEWS = 256  # views per forward at most (10-crop x a batch of 256 would be 2,560)
MULTI_SCALE_BATCH = 8  # images per evaluation batch with multi_scale (each image's scales go one forward each)


def eval_batch_size(batch_size: int, protocols: Iterable[str]) -> int:
    """Images per evaluation batch: `batch_size`, at most MULTI_SCALE_BATCH when multi_scale is evaluated.

    A multi-scale image is every scale of it whole (up to 640 x 853, flipped: ~3.7 MB of uint8), and each worker
    keeps batches in flight: 256 of them would hold GBs of host memory per rank for no speed (one forward per
    scale and image whatever the batch).
    """
    return min(batch_size, MULTI_SCALE_BATCH) if "multi_scale" in protocols else batch_size


@contextlib.contextmanager
def fixed_shape_kernels(varying: bool) -> Iterator[None]:
    """cuDNN's autotuner off while input shapes vary (multi-scale: a new benchmark for every image size)."""
    saved = torch.backends.cudnn.benchmark
    if varying:
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device) -> Iterator[None]:
    """Run the block at an evaluation precision: fp32 (TF32 off), tf32 (TF32 on), or bf16/fp16 autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"evaluation precision {precision!r} is not valid; choose one of {list(PRECISIONS)}")
    cuda = device.type == "cuda"  # TF32 is a CUDA matter; the CPU's flags stay untouched
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    try:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _forward(model: nn.Module, x: torch.Tensor, max_views: int = MAX_VIEWS) -> torch.Tensor:
    """fp32 logits of `x`, at most `max_views` images per forward; a GPU out of memory names the batch to lower."""
    try:
        return torch.cat([model(c).float() for c in x.split(max_views)])
    except torch.OutOfMemoryError:
        raise ValueError(f"out of GPU memory evaluating a batch of {x.shape[0]} views (forwards of at most "
                         f"{max_views}): lower data.batch_size, the images per evaluation batch") from None


def class_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Position of each label in its row's ranking (0 = top-1); ties go to the lower class index.

    Equals the label's position under a stable descending sort, so the top-5 predictions we report and
    the errors we count always agree, whatever the ties.
    """
    own = scores.gather(1, labels[:, None])
    idx = torch.arange(scores.shape[1], device=scores.device)
    ahead = (scores > own) | ((scores == own) & (idx[None, :] < labels[:, None]))
    return ahead.sum(1)


def top_predictions(scores: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best classes of each row (stable: ties in class order) and their scores."""
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return indices[:, :k], values[:, :k]


@dataclass
class Tally:
    """Counts for one protocol: images whose label is in the top-1 / top-5, and images seen."""

    top1: int = 0
    top5: int = 0
    images: int = 0

    def add(self, ranks: torch.Tensor) -> None:
        """Count a batch of label ranks."""
        self.top1 += int((ranks < 1).sum())
        self.top5 += int((ranks < 5).sum())
        self.images += ranks.numel()

    def errors(self) -> dict[str, Any]:
        """{"top1_err": %, "top5_err": %, "images": N}."""
        n = max(self.images, 1)
        return {"top1_err": 100.0 * (1 - self.top1 / n), "top5_err": 100.0 * (1 - self.top5 / n),
                "images": self.images}


@dataclass
class EvalResult:
    """What `evaluate` measured: per-protocol tallies, skipped images, and optional per-image rows."""

    tallies: dict[str, Tally]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, dict[str, Any]]:
        """The metrics.json schema: {protocol: {"top1_err", "top5_err", "images", "skipped"}}."""
        return {p: {**t.errors(), "skipped": len(self.skipped)} for p, t in self.tallies.items()}


def _scores(model: nn.Module, normalize: Normalize, views: torch.Tensor, device: torch.device,
            average: str, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run [B, K, 3, h, w] uint8 views (in chunks); average the K views. Returns (scores, probabilities)."""
    b, k = views.shape[:2]
    x = normalize(views.flatten(0, 1).to(device, non_blocking=True))
    x = x.contiguous(memory_format=torch.channels_last)  # as the models are trained and evaluated, CPU too
    with precision_mode(precision, device):
        logits = _forward(model, x).view(b, k, -1)
    if average == "softmax":  # the authors' released models: mean of softmax scores
        probs = logits.softmax(-1).mean(1)
        return probs, probs
    mean_logits = logits.mean(1)  # fb.resnet.torch: mean of logits
    return mean_logits, mean_logits.softmax(-1)


def _multi_scale_scores(model: nn.Module, normalize: Normalize, per_image: list[list[torch.Tensor]],
                        device: torch.device, average: str, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fully-convolutional multi-scale: each scale (and flip) of an image whole; scores averaged over all."""
    scores, probs = [], []
    for scales in per_image:
        logits = []
        for views in scales:
            x = normalize(views.to(device, non_blocking=True))
            with precision_mode(precision, device):
                logits.append(_forward(model, x))
        all_logits = torch.cat(logits)[None]  # [1, scales x flips, C]
        if average == "softmax":
            p = all_logits.softmax(-1).mean(1)
            scores.append(p)
            probs.append(p)
        else:
            m = all_logits.mean(1)
            scores.append(m)
            probs.append(m.softmax(-1))
    return torch.cat(scores), torch.cat(probs)


def evaluate(
    model: nn.Module,
    normalize: Normalize,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    protocols: list[str],
    average: str = "softmax",
    on_error: str = "raise",
    paths: list[str] | None = None,
    amp: bool = False,
    dist: Dist | None = None,
    progress: bool = True,
    precision: str | None = None,
) -> EvalResult:
    """Top-1/top-5 counts of `model` on `loader` under each protocol; per-image rows when `paths` is given.

    Under torchrun each rank reads its own shard and the counts are summed, so every image counts once.
    `precision` (PRECISIONS) defaults to fp32, or bf16 when `amp` is true.
    """
    dist = dist or Dist()
    precision = precision or ("bf16" if amp else "fp32")
    if average not in AVERAGES:
        raise ValueError(f"eval.average={average!r} is not valid; choose one of {list(AVERAGES)}")
    model.eval()
    normalize.eval()
    result = EvalResult({p: Tally() for p in protocols})
    with torch.inference_mode(), fixed_shape_kernels("multi_scale" in protocols):
        for batch in tqdm(loader, desc="eval", unit="batch", disable=not (progress and dist.is_main),
                          dynamic_ncols=True):
            # Images the pipeline could not use: stop with the worker's message, or skip and count them.
            for failed in batch["failed"]:
                if on_error == "raise":
                    raise DataError(failed.message)
                result.skipped.append((failed.path, failed.message))
            if batch["views"] is None:
                continue
            labels = batch["labels"].to(device)
            for proto in protocols:
                views = batch["views"][proto]
                if proto == "multi_scale":
                    scores, probs = _multi_scale_scores(model, normalize, views, device, average, precision)
                else:
                    scores, probs = _scores(model, normalize, views, device, average, precision)
                # Rank each label among the averaged scores: top-1 / top-5 hits.
                ranks = class_ranks(scores, labels)
                result.tallies[proto].add(ranks)
                if paths is not None:
                    _keep_rows(result, proto, batch["indices"], labels, scores, probs, paths)
    return _combine(result, dist)


def _keep_rows(result: EvalResult, proto: str, indices: torch.Tensor, labels: torch.Tensor,
               scores: torch.Tensor, probs: torch.Tensor, paths: list[str]) -> None:
    """Append predictions.csv rows (path, protocol, label, pred1..5, prob1..5) for a batch.

    The predictions are ranked by the same scores the errors are counted on (with average=logits, the
    softmax of the mean logits can tie classes whose logits differ, which would reorder them).
    """
    pred, _ = top_predictions(scores.cpu())
    prob = probs.cpu().gather(1, pred)
    for i, y, p, q in zip(indices.tolist(), labels.tolist(), pred.tolist(), prob.tolist()):
        row: dict[str, Any] = {"path": paths[i], "protocol": proto, "label": y}
        row.update({f"pred{j + 1}": p[j] if j < len(p) else "" for j in range(5)})
        row.update({f"prob{j + 1}": round(q[j], 6) if j < len(q) else "" for j in range(5)})
        result.predictions.append(row)


def _combine(result: EvalResult, dist: Dist) -> EvalResult:
    """Sum the ranks' tallies and gather their skipped lists and rows (a no-op on one process)."""
    if not dist.enabled:
        return result
    protos = list(result.tallies)
    counts = torch.tensor([[t.top1, t.top5, t.images] for t in result.tallies.values()], dtype=torch.long,
                          device=dist.device)  # NCCL reduces CUDA tensors only
    counts = all_reduce_sum(counts, dist)
    tallies = {p: Tally(*map(int, counts[i].tolist())) for i, p in enumerate(protos)}
    skipped = [s for part in gather_objects(result.skipped, dist) for s in part]
    rows = [r for part in gather_objects(result.predictions, dist) for r in part]
    return EvalResult(tallies, skipped, rows)
