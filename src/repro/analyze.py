"""`repro-analyze`: ResNet Fig. 7 for given checkpoints: the std of each 3x3 layer's response, in a table and a plot.

    repro-analyze checkpoints=[outputs/train/r20/checkpoints/last.pt,outputs/train/p20/checkpoints/last.pt]

Reads repro-train checkpoints of the CIFAR ResNets and plain nets (paper §4.2); writes `stds.json` and `fig7.png`
to its run dir beside the resolved config. `repro-tables` draws the same figure from finished runs it finds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig

from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE, check_overrides, fail, save_run_info
from repro.config import register_configs
from repro.distributed import select_device
from repro.report.responses import checkpoint_response_stds


def _paths(value: Any) -> list[str]:
    """`checkpoints=` as a list of paths (one path or a list)."""
    if value is None:
        fail("checkpoints= is required: one repro-train checkpoint or a list, e.g. "
             "checkpoints=[outputs/train/r20/checkpoints/last.pt]")
    paths = [str(p) for p in value] if isinstance(value, (list, ListConfig)) else [str(value)]
    if not paths:
        fail("checkpoints=[] names no checkpoint; give at least one repro-train checkpoint")
    return paths


def labels_for(results: list[dict[str, Any]]) -> list[str]:
    """One label per result: the model name, with the run's folder name where two share a model."""
    names = [r["model"] for r in results]
    return [n if names.count(n) == 1 else f"{n} ({Path(r['checkpoint']).parent.parent.name})"
            for n, r in zip(names, results)]


def format_table(results: list[dict[str, Any]], labels: list[str]) -> str:
    """Layer-by-layer stds, one column per checkpoint (nets of different depths leave blanks)."""
    width = max(12, *(len(label) for label in labels))
    names = max((r["layers"] for r in results), key=len)  # the deepest net's layers
    name_width = max(len(n) for n in names)
    head = f"{'#':>4}  {'layer':<{name_width}}  " + "  ".join(f"{label:>{width}}" for label in labels)
    lines = [head, "-" * len(head)]
    for i, name in enumerate(names):
        cells = [f"{r['std'][i]:>{width}.4f}" if i < len(r["std"]) else " " * width for r in results]
        lines.append(f"{i + 1:>4}  {name:<{name_width}}  " + "  ".join(cells))
    lines.append("")
    lines += [f"{label}: {r['images']} images of {r['data']}/{r['split']}, {len(r['std'])} layers "
              f"({r['layers'][0]} ... {r['layers'][-1]}), {r['checkpoint']}" for label, r in zip(labels, results)]
    return "\n".join(lines)


@hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_DIR, config_name="analyze")
def _analyze(cfg: DictConfig) -> None:
    """Measure each checkpoint's layer-response stds, print them, keep them and Fig. 7 in the run dir."""
    try:
        device = select_device(cfg.device)
    except ValueError as e:
        fail(str(e))
    paths = _paths(cfg.checkpoints)
    # Every checkpoint's stds on `images` images of its evaluation split, spread evenly over it.
    results = []
    for path in paths:
        try:
            results.append(checkpoint_response_stds(path, data_root=cfg.data_root, split=cfg.split,
                                                    max_images=cfg.images, device=device))
        except ValueError as e:
            fail(str(e))
    labels = labels_for(results)
    out = save_run_info(cfg)
    (out / "stds.json").write_text(json.dumps(dict(zip(labels, results)), indent=2) + "\n")
    from repro.report.figures import resnet_fig7

    data = ", ".join(sorted({f"{r['data']}/{r['split']}" for r in results}))
    resnet_fig7([], out / "fig7.png", stds={label: r["std"] for label, r in zip(labels, results)}, data=data)
    if cfg.format == "json":
        print(json.dumps(dict(zip(labels, results))))
    else:
        print(format_table(results, labels))
        print(f"stds: {out / 'stds.json'}; figure: {out / 'fig7.png'}")


def main() -> None:
    """Console entry point of `repro-analyze`."""
    register_configs()
    check_overrides("analyze")
    _analyze()


if __name__ == "__main__":
    main()
