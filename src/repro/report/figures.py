"""The papers' figures from runs (matplotlib, PNG): ResNet Figs. 4, 6, 7 and MobileNet Figs. 4, 5.

Curves are drawn from the training runs of each row's experiment (the runs its table would count, finished or
not): training error from TensorBoard's `train/err`, the per-epoch evaluation from metrics.jsonl, on the split
it names (`"split"`; lines written before it was recorded hold `"val"`, on the run's `val_split`), labelled
with that split. A figure whose runs do not exist yet is drawn with the paper's points only and says so.
Each figure function writes its PNG and returns a `Plot` whose matplotlib Figure keeps the plotted data.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.report.reference import RESULT_TABLES, PaperRow, PaperTable
from repro.report.results import (
    LATENCY_COMMAND,
    LATENCY_SETTING,
    Latency,
    RunRecord,
    TableResult,
    experiment_config,
    is_faithful,
)

log = logging.getLogger(__name__)

TABLES = {t.id: t for t in RESULT_TABLES}
NO_RUNS = "no runs yet: paper figures only"


def _plt() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------- curves


@dataclass
class Curve:
    """A run's per-epoch evaluation: the split it was measured on, steps and center-crop top-1 error (%)."""

    split: str | None
    steps: list[int]
    errs: list[float]


def eval_curve(run: RunRecord) -> Curve:
    """The per-epoch evaluation curve from metrics.jsonl (either line format), else from TensorBoard."""
    default = run.config.get("val_split")
    by_split: dict[str | None, Curve] = {}
    last = None
    path = run.path / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                split = rec.get("split")
                err = float((rec[split] if split is not None else rec["val"])["center"]["top1_err"])
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line cut short by a killed run
            last = split if split is not None else default  # old lines: the run's val_split, named "val"
            curve = by_split.setdefault(last, Curve(last, [], []))
            curve.steps.append(step)
            curve.errs.append(err)
    if by_split:
        return by_split[last]
    for tag in dict.fromkeys((f"{default}/top1_err", "val/top1_err")):  # new runs: <split>/..., old: val/...
        steps, values = _scalars(run, tag)
        if steps:
            return Curve(default, steps, values)
    return Curve(default, [], [])


def val_curve(run: RunRecord) -> tuple[list[int], list[float]]:
    """(steps, center-crop top-1 error %) after each evaluation, whatever split it was on (see `eval_curve`)."""
    curve = eval_curve(run)
    return curve.steps, curve.errs


def _scalars(run: RunRecord, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one TensorBoard scalar of the run (`tb/`); empty when absent."""
    tb = run.path / "tb"
    if not tb.is_dir():
        return [], []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return [], []
    events = acc.Scalars(tag)
    return [e.step for e in events], [e.value for e in events]


def train_curve(run: RunRecord) -> tuple[list[int], list[float]]:
    """(steps, training error %) as logged to TensorBoard (`tb/`, scalar `train/err`)."""
    return _scalars(run, "train/err")


@dataclass
class Plot:
    """A drawn figure: the matplotlib Figure (closed, its Axes and their data kept) and how many runs it draws."""

    figure: Any
    runs: int


def _runs_for(runs: list[RunRecord], table: PaperTable, row: PaperRow) -> list[RunRecord]:
    """Training runs of the row's experiment (finished or not) that have a curve to draw."""
    return [r for r in runs if r.kind == "train" and is_faithful(r, table, row)
            and ((r.path / "metrics.jsonl").is_file() or (r.path / "tb").is_dir())]


def _curve_panel(ax: Any, runs: list[RunRecord], table: PaperTable, rows: list[PaperRow],
                 paper: dict[str, float], title: str, iterations: float) -> tuple[int, list[str]]:
    """Thin training error and bold evaluation error per row; the paper's final errors dashed.

    Returns the runs drawn and the splits of the bold curves drawn (the y label names them, or the rows'
    experiment's val_split when none is drawn); lines carry gid `train:<run dir>` / `eval:<run dir>`.
    """
    plt = _plt()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn, splits = 0, []
    for i, row in enumerate(rows):
        color = colors[i % len(colors)]
        labelled = False
        for run in _runs_for(runs, table, row):
            (ts, te), curve = train_curve(run), eval_curve(run)
            if ts:
                ax.plot([s / 1e4 for s in ts], te, color=color, linewidth=0.6, alpha=0.8, gid=f"train:{run.path}")
            if curve.steps:
                ax.plot([s / 1e4 for s in curve.steps], curve.errs, color=color, linewidth=2.0, gid=f"eval:{run.path}",
                        label=None if labelled else row.label)
                labelled = True
                splits += [curve.split] if curve.split not in splits else []
            drawn += bool(ts or curve.steps)
        if row.label in paper:
            ax.axhline(paper[row.label], color=color, linestyle="--", linewidth=0.8,
                       label=f"{row.label} paper {paper[row.label]:.2f}")
    ax.set_title(title)
    ax.set_xlabel("iterations (1e4)")
    ax.set_ylabel(f"{' / '.join(splits) or _default_split(table, rows[0])} error (%) bold, train error (%) thin")
    ax.set_xlim(0, iterations / 1e4)  # the paper's training length, however far the runs have got
    if not drawn:
        ax.text(0.5, 0.5, NO_RUNS, transform=ax.transAxes, ha="center", va="center", color="gray")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return drawn, splits


def _default_split(table: PaperTable, row: PaperRow) -> str:
    """The split the row's experiment evaluates after each epoch (its val_split)."""
    return str(experiment_config(table, row).get("val_split") or "val")


def _splits(table: PaperTable, *panels: list[str]) -> str:
    """The evaluation splits drawn in several panels, once each ('test', 'val / test'); none drawn: the table's
    experiment's."""
    out: list[str] = []
    for splits in panels:
        out += [s for s in splits if s not in out]
    return " / ".join(out) or _default_split(table, table.rows[0])


def _curve_figure(table: PaperTable, runs: list[RunRecord], panels: list[tuple[list[PaperRow], str]],
                  iterations: float, title: str, path: Path, width: float, ylim: float | None = None) -> Plot:
    """Side-by-side curve panels (one per (rows, title)) sharing the y axis; `title` gets the drawn splits."""
    plt = _plt()
    paper = {r.label: r.paper["top1_err"] for r in table.rows}
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4), sharey=True)
    drawn, splits = 0, []
    for ax, (rows, name) in zip(axes, panels):
        n, s = _curve_panel(ax, runs, table, rows, paper, name, iterations)
        drawn, splits = drawn + n, [*splits, s]
        if ylim is not None:
            ax.set_ylim(0, ylim)
    fig.suptitle(title.format(splits=_splits(table, *splits)), fontsize=9)
    return _save(fig, path, drawn)


def resnet_fig4(runs: list[RunRecord], path: Path) -> Plot:
    """ResNet Fig. 4: ImageNet plain-18/34 (left) and ResNet-18/34 (right), thin train, bold val error."""
    table = TABLES["resnet_table2"]
    rows = {r.label: r for r in table.rows}
    return _curve_figure(table, runs, [([rows["plain-18"], rows["plain-34"]], "plain networks"),
                                       ([rows["ResNet-18"], rows["ResNet-34"]], "ResNets (option A)")], 60e4,
                         "ResNet Fig. 4: ImageNet training (thin) and center-crop {splits} (bold) error; dashed: "
                         "paper's 10-crop Table 2", path, width=10)


# Fig. 6's plain nets are rows of experiment resnet_fig6 (Table 6 has no plain nets).
FIG6_PLAINS = [PaperRow(f"plain-{n}", f"plain{n}", select={"experiment": "resnet_fig6", "row": f"cifar_plain{n}"})
               for n in (20, 32, 44, 56)]


def resnet_fig6(runs: list[RunRecord], path: Path) -> Plot:
    """ResNet Fig. 6: CIFAR-10 plain-20...56, ResNet-20...110, ResNet-110 vs 1202; thin train, bold test error."""
    table = TABLES["resnet_table6"]
    resnets = {r.model: r for r in table.rows}
    return _curve_figure(table, runs, [(FIG6_PLAINS, "plain networks"),
                                       ([resnets[f"resnet{n}"] for n in (20, 32, 44, 56, 110)], "ResNets"),
                                       ([resnets["resnet110"], resnets["resnet1202"]], "ResNet-110 vs 1202")],
                         64e3, "ResNet Fig. 6: CIFAR-10 training (thin) and {splits} (bold) error; dashed: paper's "
                         "Table 6 test error", path, width=14, ylim=20)


FIG7_MODELS = ("plain20", "plain56", "resnet20", "resnet56", "resnet110")
FIG7_DATASET = TABLES["resnet_table6"].dataset  # Fig. 7 measures the CIFAR nets of Table 6


def fig7_checkpoints(runs: list[RunRecord]) -> dict[str, tuple[Path, str]]:
    """One CIFAR-10 checkpoint per Fig. 7 model (option A): the newest finished run's last.pt (or a record's model.pt)
    and its eval split."""
    found: dict[str, tuple[Path, str]] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        name = run.model.get("name")
        ck = run.path / "checkpoints" / "last.pt"
        if not ck.is_file():  # a committed run record (results/runs/...) keeps only the final weights
            ck = run.path / "model.pt"
        if (run.kind == "train" and run.metrics is not None and name in FIG7_MODELS and ck.is_file()
                and run.dataset == FIG7_DATASET and run.model.get("shortcut", "A") == "A"):
            found[name] = (ck, run.split)
    return found


def resnet_fig7(runs: list[RunRecord], path: Path, max_images: int = 1000,
                stds: dict[str, list[float]] | None = None, data: str = "CIFAR-10") -> Plot:
    """ResNet Fig. 7: std of each 3x3 layer's response (after BN, before ReLU), network order and sorted.

    The stds are measured from the finished CIFAR-10 runs among `runs`, or given as `stds` (label -> stds).
    """
    plt = _plt()
    if stds is None:
        stds = {}
        for name, (ck, split) in fig7_checkpoints(runs).items():
            from repro.report.responses import checkpoint_response_stds

            try:
                stds[name] = checkpoint_response_stds(ck, split=split, max_images=max_images)["std"]
            except ValueError as e:  # its data is not on this machine, say: draw the others
                log.warning("Fig. 7: skipping %s (%s)", ck, e)
    fig, axes = plt.subplots(2, 1, figsize=(8, 6))
    for name in [n for n in FIG7_MODELS if n in stds] + [n for n in stds if n not in FIG7_MODELS]:
        label = name.replace("resnet", "ResNet-").replace("plain", "plain-")
        axes[0].plot(range(1, len(stds[name]) + 1), stds[name], linewidth=1, label=label, gid=name)
        axes[1].plot(range(1, len(stds[name]) + 1), sorted(stds[name], reverse=True), linewidth=1, label=label,
                     gid=name)
    axes[0].set_xlabel("layer index (original)")
    axes[1].set_xlabel("layer index (sorted by magnitude)")
    for ax in axes:
        ax.set_ylabel("std")
        if stds:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no runs yet (the paper prints no numbers for this figure)", transform=ax.transAxes,
                    ha="center", va="center", color="gray")
    fig.suptitle(f"ResNet Fig. 7: std of layer responses on {data} (after BN, before ReLU)", fontsize=9)
    return _save(fig, path, len(stds))


def _mobilenet_points(result: TableResult, x: str) -> tuple[list, list, list, list]:
    """(paper, TF-slim, ours, our std) points (x, top-1 acc, label) of the grid for x = madds_m | params_m."""
    paper, slim, ours, std = [], [], [], []
    for r in result.rows:
        row = r.row
        if "top1_acc" in row.paper and x in row.paper:
            paper.append((row.paper[x], row.paper["top1_acc"], row.label))
        if "top1_acc" in row.ref and x in row.ref:
            slim.append((row.ref[x], row.ref["top1_acc"], row.label))
        values = r.ours["top1_acc"]
        if values:
            ours.append((r.madds_m if x == "madds_m" else r.params_m, statistics.fmean(values), row.label))
            std.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return paper, slim, ours, std


def mobilenet_fig(result: TableResult, path: Path, x: str) -> Plot:
    """MobileNet Fig. 4 (x = madds_m, log scale) or Fig. 5 (x = params_m): top-1 accuracy of the 16 models."""
    plt = _plt()
    paper, slim, ours, std = _mobilenet_points(result, x)
    fig, ax = plt.subplots(figsize=(7, 5))
    if paper:
        ax.scatter([p[0] for p in paper], [p[1] for p in paper], marker="o", color="black", label="paper (Tables 6-7)",
                   gid="paper")
    if slim:
        ax.scatter([p[0] for p in slim], [p[1] for p in slim], marker="x", color="gray", label="TF-slim release",
                   gid="slim")
    if ours:
        bars = ax.errorbar([p[0] for p in ours], [p[1] for p in ours], yerr=std, fmt="s", color="tab:red", label="ours")
        bars.lines[0].set_gid("ours")
        for p in ours:
            ax.annotate(p[2].replace(" MobileNet", ""), (p[0], p[1]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    else:
        ax.text(0.5, 0.08, NO_RUNS, transform=ax.transAxes, ha="center", color="gray")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xticks([10, 20, 50, 100, 200, 500] if x == "madds_m" else [0.5, 1, 2, 4])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("million mult-adds (log scale)" if x == "madds_m" else "million parameters (log scale)")
    ax.set_ylabel("ImageNet top-1 accuracy (%)")
    fig_no = 4 if x == "madds_m" else 5
    ax.set_title(f"MobileNet Fig. {fig_no}: accuracy vs {'mult-adds' if fig_no == 4 else 'parameters'}, "
                 "width {1, 0.75, 0.5, 0.25} x resolution {224, 192, 160, 128}", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path, len(ours))


def _latency_points(result: TableResult, latency: Latency) -> list[tuple[float, float, float, str, str]]:
    """(latency ms, top-1 acc, our mult-adds M, label, whose accuracy) of the rows measured by repro-bench; the
    accuracy is ours where runs exist, else the paper's, else the second reference's (TF-slim)."""
    points = []
    for r in result.rows:
        ms = latency.of(r.config, **LATENCY_SETTING)
        acc, whose = ((statistics.fmean(r.ours["top1_acc"]), "ours") if r.ours.get("top1_acc") else
                      (r.row.paper["top1_acc"], "paper") if "top1_acc" in r.row.paper else
                      (r.row.ref["top1_acc"], "ref") if "top1_acc" in r.row.ref else (None, ""))
        if ms is not None and acc is not None:
            points.append((ms, acc, r.madds_m, r.row.label, whose))
    return points


def mobilenet_latency(results: list[TableResult], latency: Latency | None, path: Path) -> Plot:
    """Beside MobileNet Fig. 4: top-1 accuracy against measured latency (left) and latency against mult-adds
    (right, log-log) for the MobileNetV1 grid and the MobileNetV2 widths/resolutions (ONNX Runtime, 1 thread,
    batch 1): where the papers' mult-adds proxy and measured latency disagree."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    drawn, measured = 0, []
    styles = {"mobilenet_grid": ("MobileNetV1", "o", "tab:blue"),
              "mobilenetv2_grid": ("MobileNetV2", "^", "tab:orange")}
    for result in results:
        if result.id not in styles or latency is None:
            continue
        name, marker, color = styles[result.id]
        points = _latency_points(result, latency)
        if not points:
            continue
        drawn += len(points)
        measured += points
        left.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, color=color, label=name, gid=name)
        right.scatter([p[2] for p in points], [p[0] for p in points], marker=marker, color=color, label=name,
                      gid=name)
        for p in points:
            left.annotate(p[3].replace(" MobileNet", "").replace("MobileNetV2 ", "V2 "), (p[0], p[1]), fontsize=5,
                          xytext=(2, 2), textcoords="offset points")
    if drawn:
        m = latency.machine
        setting = f"ONNX Runtime, 1 thread, batch 1, {m.get('cpu', '?')}"
        left.set_xlabel(f"latency (ms; {setting})", fontsize=7)
        left.set_ylabel("ImageNet top-1 accuracy (%): ours where trained, else paper / TF-slim", fontsize=7)
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xticks([10, 20, 50, 100, 200, 500])
        right.set_yticks([1, 2, 5, 10, 20, 50, 100, 200])
        for axis in (right.xaxis, right.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        right.set_xlim(min(p[2] for p in measured) / 1.3, max(p[2] for p in measured) * 1.3)
        right.set_ylim(min(p[0] for p in measured) / 1.3, max(p[0] for p in measured) * 1.3)
        right.set_xlabel("million mult-adds (our count, log scale)")
        right.set_ylabel("latency (ms, log scale)")
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    else:
        for ax in (left, right):
            ax.text(0.5, 0.5, f"no latency measured yet: run {LATENCY_COMMAND}", transform=ax.transAxes,
                    ha="center", va="center", color="gray", fontsize=8)
    fig.suptitle("MobileNets: accuracy vs measured latency (left) and latency vs mult-adds (right), beside "
                 "MobileNet Fig. 4", fontsize=9)
    return _save(fig, path, drawn)


def _save(fig: Any, path: Path, drawn: int) -> Plot:
    """Write the figure as PNG and close it (its Axes and data stay readable); returns the Plot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return Plot(fig, drawn)


def write_figures(results: list[TableResult], runs: list[RunRecord], out: Path, fig7_images: int = 1000,
                  latency: Latency | None = None) -> dict[str, Plot]:
    """Every figure under `out/figures/`: file name -> its Plot (runs drawn; models for Fig. 7; measured models
    for the latency figure)."""
    grid = next((r for r in results if r.id == "mobilenet_grid"), None)
    figs = out / "figures"
    drawn = {"resnet_fig4.png": resnet_fig4(runs, figs / "resnet_fig4.png"),
             "resnet_fig6.png": resnet_fig6(runs, figs / "resnet_fig6.png"),
             "resnet_fig7.png": resnet_fig7(runs, figs / "resnet_fig7.png", fig7_images)}
    if grid is not None:
        drawn["mobilenet_fig4.png"] = mobilenet_fig(grid, figs / "mobilenet_fig4.png", "madds_m")
        drawn["mobilenet_fig5.png"] = mobilenet_fig(grid, figs / "mobilenet_fig5.png", "params_m")
        drawn["mobilenet_latency.png"] = mobilenet_latency(results, latency, figs / "mobilenet_latency.png")
    return drawn
