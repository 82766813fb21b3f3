"""scikit-learn's handwritten digits (1797 real 8x8 scans, bundled with the package): the offline default."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

DIGIT_SPLITS = ("train", "val", "test", "trainval")


def digits_tensors(cfg: Any, split: str) -> tuple[torch.Tensor, list[int], list[str], list[int]]:
    """uint8 [N, 3, S, S] digits (upscaled, gray as RGB), labels, class names and indices into the 1797 for `split`.

    test: `cfg.test_size` images; val: half as many, carved from the rest; both fixed by `cfg.split_seed`.
    """
    from sklearn.datasets import load_digits

    if split not in DIGIT_SPLITS:
        raise ValueError(f"data.split={split!r} is not valid for data=digits; choose one of {list(DIGIT_SPLITS)}")
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div(16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    images = images.mul(255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.split_seed))
    n_test, n_val = cfg.test_size, cfg.test_size // 2
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:],
             "trainval": order[n_test:]}
    idx = parts[split].sort().values
    return images[idx], labels[idx].tolist(), [str(d) for d in range(10)], idx.tolist()
