"""The papers' result tables with our runs beside them: run discovery, row matching, `<id>.md` / `<id>.csv`.

A run is a directory written by `repro-train` (metrics.json at the end, metrics.jsonl and tb/ while it trains)
or by `repro-eval` (metrics.json). A run counts for a paper row only when it is a run of the row's experiment:
its resolved config equals what `repro-train experiment=<exp> <row's overrides>` composes, every key (model,
data, splits, recipe, protocol), except the keys that cannot change the result (`RESULT_NEUTRAL`: paths,
workers, device, logging, checkpoint cadence, name, seed...). It must also have used the whole split (no
`data.limit`) and measured the table's protocol. A run of the row's model on the table's dataset that differs
anywhere else is a deviating run: listed under the table with the keys that differ, never in `ours`.
Published weights evaluated by repro-eval are matched on dataset, split and model (`matches`) and listed apart.
Compute columns (mult-adds, parameters) come from the models themselves, so they are filled with no runs.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from glob import glob
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from repro.cli import CONFIG_DIR, HYDRA_VERSION_BASE
from repro.config import DATA_SCHEMAS, MODEL_SCHEMAS, EvalOptions, RecipeConfig, TrainConfig, TrainerConfig
from repro.data.datasets import SPECS
from repro.models import create_model_from_config
from repro.report.complexity import summarize
from repro.report.reference import RESULT_TABLES, PaperRow, PaperTable

log = logging.getLogger(__name__)

# Model-config keys that do not change which paper row a model is: the class count follows the dataset,
# zero-init / dropout / activation are recipe details, the zero-padding placement of option A and the stride
# placement of bottlenecks are how published reproductions differ from the authors' code for the same row.
MATCH_IGNORES = frozenset({"num_classes", "zero_init_residual", "dropout", "activation", "shortcut_pad",
                           "stride_in_1x1"})
MISSING = "—"


# ---------------------------------------------------------------------------------------------------- runs


@dataclass
class RunRecord:
    """One run directory: its resolved config, its final metrics (None while it trains) and what it is."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any] | None
    kind: str  # train | eval

    @property
    def model(self) -> dict[str, Any]:
        """The run's model config."""
        return self.config["model"]

    @property
    def dataset(self) -> str:
        """The `data` config's name (imagenet, cifar10, ...)."""
        return self.config["data"].get("name", "")

    @property
    def split(self) -> str | None:
        """The split its final metrics were measured on."""
        if self.kind == "eval":
            return self.config["data"].get("split")
        if self.metrics and "split" in self.metrics:
            return self.metrics["split"]
        return self.config.get("test_split") or self.config.get("val_split")

    @property
    def weights_format(self) -> str:
        """repro for our own checkpoints; the published format an eval run loaded otherwise."""
        return (self.metrics or {}).get("weights", {}).get("format", "repro") if self.kind == "eval" else "repro"

    @property
    def source(self) -> Path:
        """The training run these metrics come from (an eval run of a repro checkpoint points at its run dir)."""
        if self.kind == "train":
            return self.path.resolve()
        weights = Path((self.metrics or {}).get("weights", {}).get("path", self.path))
        parent = weights.parent
        if parent.name == "checkpoints":
            return parent.parent.resolve()
        is_run_dir = (parent / "config.yaml").is_file() or (parent / "metrics.json").is_file()
        return (parent if is_run_dir else weights).resolve()  # a run record's model.pt beside its config

    def value(self, protocol: str, metric: str) -> float | None:
        """Metric (top1_err, top5_err, top1_acc, top5_acc) under `protocol`, in %; None if not measured."""
        measured = (self.metrics or {}).get(protocol)
        if not isinstance(measured, dict):
            return None
        err = measured.get(metric.replace("_acc", "_err"))
        if err is None:
            return None
        return 100.0 - float(err) if metric.endswith("_acc") else float(err)


class RunsError(ValueError):
    """A `runs=` argument that names nothing readable."""


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None (with a warning) when it is unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("skipping %s: not readable JSON (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None


def load_run(path: Path) -> RunRecord | None:
    """The run in directory `path`, or None when it is not a training/eval run of a model on a dataset."""
    metrics = _read_json(path / "metrics.json") if (path / "metrics.json").is_file() else None
    config = (metrics or {}).get("config")
    if config is None and (path / "config.yaml").is_file():
        try:
            config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=False)
        except Exception as e:  # a hand-edited or truncated file: say which and go on
            log.warning("skipping %s: config.yaml is not readable (%s)", path, e)
            return None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not isinstance(
            config.get("data"), dict) or "name" not in config["model"]:
        return None
    kind = "eval" if "weights" in config and "recipe" not in config else "train"
    if metrics is None and kind == "eval":
        return None
    return RunRecord(path, config, metrics, kind)


def _run_dirs(root: Path) -> Iterable[Path]:
    """Directories under `root` (itself included) holding metrics.json or config.yaml."""
    if (root / "metrics.json").is_file() or (root / "config.yaml").is_file():
        yield root
    for name in ("metrics.json", "config.yaml"):
        for f in sorted(root.rglob(name)):
            hidden = any(part.startswith(".") for part in f.relative_to(root).parts)  # Hydra's .hydra/ copies
            done = name == "config.yaml" and (f.parent / "metrics.json").is_file()  # found by its metrics.json
            if f.parent != root and not hidden and not done:
                yield f.parent


def discover_runs(patterns: Iterable[str], strict: bool = True) -> list[RunRecord]:
    """Every run under the given directories or glob patterns; a pattern matching nothing is an error if strict."""
    seen: set[Path] = set()
    runs: list[RunRecord] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob(str(pattern))) if any(c in str(pattern) for c in "*?[") else [
            Path(pattern)]
        matches = [m.parent if m.is_file() else m for m in matches if m.exists()]
        if not matches:
            if strict:
                raise RunsError(f"runs={pattern}: no such directory or matching path; give the folder(s) that hold "
                                f"run dirs, e.g. runs=multirun/train or runs='outputs/train/*'")
            continue
        for root in matches:
            for d in _run_dirs(root):
                key = d.resolve()
                if key in seen:
                    continue
                seen.add(key)
                run = load_run(d)
                if run is not None:
                    runs.append(run)
    return runs


# ------------------------------------------------------------------------------------------------ rows


@cache
def _model_defaults(name: str) -> dict[str, Any]:
    """What a run of `model=<name>` carries: the keys of `configs/model/<name>.yaml` over its schema's defaults."""
    raw = OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{name}.yaml")
    raw.pop("defaults", None)
    schema = OmegaConf.structured(MODEL_SCHEMAS[_schema_base("model", name)])
    return OmegaConf.to_container(OmegaConf.merge(schema, raw), enum_to_str=True)


def row_config(row: PaperRow) -> dict[str, Any]:
    """The model config a run of this row carries: the model's config file with the row's options."""
    cfg = {**_model_defaults(row.model), **row.kwargs}
    if row.resolution is not None:
        cfg["resolution"] = row.resolution
    return cfg


def matches(run: RunRecord, table: PaperTable, row: PaperRow) -> bool:
    """Does the run measure this row of this table (dataset, split, model and options)?"""
    if run.dataset != table.dataset or run.split != table.split:
        return False
    if run.config["data"].get("limit") is not None:  # a smoke test on a sample of the split, not the split
        return False
    want, have = row_config(row), run.model
    if have.get("name") != want["name"]:
        return False
    return all(have.get(k) == v or _same_number(have.get(k), v) for k, v in want.items() if k not in MATCH_IGNORES)


def _same_number(a: Any, b: Any) -> bool:
    """1 == 1.0 for options such as width_mult given as an int on the command line."""
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and float(a) == b


# ------------------------------------------------------------------------------------------ row matching

# Config keys that cannot change a run's result: where the data live and how fast they are read (data.batch_size
# is the per-process evaluation batch; the global training batch is recipe.batch_size, however it is split over
# processes and trainer.grad_accum), the device, its kernels and its JPEG decoder, logging and checkpoint cadence,
# the run's name, which split data.split names (read by repro-eval only), the model's class count (it follows the
# dataset), which extra final protocols were measured (the table's own must be there) and the seed (ours is the
# mean over seeds).
RESULT_NEUTRAL = frozenset({
    "name", "resume", "seed", "final_protocols", "model.num_classes", "data.root", "data.train_dir", "data.val_dir",
    "data.download", "data.num_workers", "data.batch_size", "data.split", "trainer.device", "trainer.progress",
    "trainer.log_every", "trainer.checkpoint_every", "trainer.compile", "trainer.channels_last",
    "trainer.cudnn_benchmark", "trainer.grad_accum", "data.decode"})
# Neutral too, unless the schedule follows the validation error (plateau): then which split is evaluated and how
# often decides when the lr drops.
VAL_KEYS = frozenset({"val_split", "trainer.eval_every"})
# repro-eval options that cannot change the numbers (eval.amp: the final evaluation of a CUDA training run is
# autocast too); the others (average, resize, crop, scales, flip, interpolation, antialias) are the protocol.
EVAL_NEUTRAL = frozenset({"protocols", "device", "progress", "save_predictions", "amp"})
ABSENT = "(absent)"


def _flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys (lists stay values)."""
    flat: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _same(a: Any, b: Any) -> bool:
    """Config values equal, numbers by value (64000 == 64000.0), lists element by element."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or _same_number(a, b)


@cache
def _compose_train(overrides: tuple[str, ...]) -> dict[str, Any]:
    """The resolved config `repro-train <overrides>` runs with (Hydra's compose API on the project's configs)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from repro.config import register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside repro-tables' own @hydra.main: the same config dir
        cfg = compose("train", overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=HYDRA_VERSION_BASE):
            cfg = compose("train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def _override(key: str, value: Any) -> str:
    """A command-line override `key=value`."""
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def row_overrides(table: PaperTable, row: PaperRow) -> list[str]:
    """The repro-train overrides that train this row: `experiment=<exp>` and the row's selection."""
    select = dict(row.select)
    experiment = select.pop("experiment", table.experiment)
    if (Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml").is_file():
        return [f"experiment={experiment}", *(_override(k, v) for k, v in select.items())]
    # A table with no experiment file (tests' ad-hoc tables): the defaults with the row's model.
    out = [f"model={row.model}", *(_override(f"model.{k}", v) for k, v in row.kwargs.items())]
    if row.resolution is not None:
        out.append(f"model.resolution={row.resolution}")
    return out + [_override(k, v) for k, v in select.items()]


def experiment_config(table: PaperTable, row: PaperRow) -> dict[str, Any]:
    """The resolved config of the row's experiment, as `repro-train experiment=<exp> row=<row>` composes it."""
    return _compose_train(("name=x", *row_overrides(table, row)))


def _schema_base(group: str, name: str) -> str | None:
    """The schema a `configs/<group>/<name>.yaml` builds on (its `base_*` default), None if there is no such file."""
    path = Path(CONFIG_DIR) / group / f"{name}.yaml"
    if not path.is_file():
        return None
    defaults = OmegaConf.load(path).get("defaults", [])
    return next((d for d in defaults if isinstance(d, str) and d.startswith("base_")), None)


@cache
def _schema_defaults(model: str, data: str) -> dict[str, Any]:
    """Dotted key -> the schema's default (src/repro/config.py) for a train config of this model and data."""
    def plain(node: Any) -> dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.structured(node))

    cfg = plain(TrainConfig)
    cfg["recipe"], cfg["trainer"] = plain(RecipeConfig), plain(TrainerConfig)
    model_base, data_base = _schema_base("model", model), _schema_base("data", data)
    cfg["model"] = plain(MODEL_SCHEMAS[model_base]) if model_base in MODEL_SCHEMAS else {}
    cfg["data"] = plain(DATA_SCHEMAS[data_base]) if data_base in DATA_SCHEMAS else {}
    return {k: v for k, v in _flatten(cfg).items() if v != "???"}


def _old_global_batch(cfg: dict[str, Any], run_dir: Path | None) -> Any:
    """The global batch of a run made when data.batch_size was the per-process training batch: its train.log's
    `global batch N`, else data.batch_size x trainer.grad_accum (one process)."""
    log_file = run_dir / "train.log" if run_dir is not None else None
    if log_file is not None and log_file.is_file():
        found = re.findall(r"global batch (\d+)", log_file.read_text(errors="replace"))
        if found:
            return int(found[-1])
    batch = cfg.get("data", {}).get("batch_size")
    accum = cfg.get("trainer", {}).get("grad_accum", 1) or 1
    return batch * accum if isinstance(batch, int) else batch


def canonical_config(cfg: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """A train config as dotted keys, in today's meaning of recipe.batch_size (the global batch) and
    recipe.lr_batch_size (the batch the lr is quoted for; null = batch_size)."""
    cfg = copy.deepcopy(cfg)
    recipe = cfg.get("recipe")
    if isinstance(recipe, dict):
        if "lr_batch_size" not in recipe:  # written before the split: recipe.batch_size was the lr's batch
            recipe["lr_batch_size"] = recipe.get("batch_size")
            recipe["batch_size"] = _old_global_batch(cfg, run_dir)
        if recipe.get("lr_batch_size") is None:
            recipe["lr_batch_size"] = recipe.get("batch_size")
    if "test_split" in cfg:  # the split reported: test_split=null reports val_split
        cfg["test_split"] = cfg["test_split"] or cfg.get("val_split")
    return _flatten(cfg)


def config_deviations(have: dict[str, Any], want: dict[str, Any], run_dir: Path | None = None
                      ) -> dict[str, tuple[Any, Any]]:
    """Result-changing keys where train config `have` differs from `want`: key -> (have's value, want's value).

    A key one config lacks (a run made at an older commit) stands for the schema's default.
    """
    a, b = canonical_config(have, run_dir), canonical_config(want)
    defaults = _schema_defaults(str(want.get("model", {}).get("name")), str(want.get("data", {}).get("name")))
    plateau = "plateau" in (a.get("recipe.schedule.name"), b.get("recipe.schedule.name"))
    neutral = RESULT_NEUTRAL if plateau else RESULT_NEUTRAL | VAL_KEYS
    diffs = {}
    for key in sorted({*a, *b} - neutral):
        x, y = a.get(key, defaults.get(key, ABSENT)), b.get(key, defaults.get(key, ABSENT))
        if not _same(x, y):
            diffs[key] = (x, y)
    return diffs


def _config_of(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config a run dir holds (metrics.json's, config.yaml, .hydra/config.yaml), None if none."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        config = (_read_json(metrics) or {}).get("config")
        if isinstance(config, dict):
            return config
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            except Exception:  # unreadable: try the next
                continue
    return None


@cache
def _checkpoint_config(path: str, mtime: float) -> dict[str, Any] | None:
    """The run config a repro checkpoint stores (read once per file version), None if it holds none."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a checkpoint torch can read
        return None
    config = stored.get("config") if isinstance(stored, dict) else None
    return config if isinstance(config, dict) else None


def training_config(run: RunRecord) -> tuple[dict[str, Any] | None, Path | None]:
    """(the config the run's model was trained with, its run dir): an eval run's from its training run dir, else
    from the checkpoint it read, with the model config it evaluated."""
    if run.kind == "train":
        return run.config, run.path
    source = run.source
    config = _config_of(source) if source.is_dir() else None
    if config is None or "recipe" not in config:
        weights = Path((run.metrics or {}).get("weights", {}).get("path", ""))
        mtime = weights.stat().st_mtime if weights.is_file() else None
        config = copy.deepcopy(_checkpoint_config(str(weights), mtime)) if mtime is not None else None
        source = None
    if not isinstance(config, dict) or "recipe" not in config:
        return None, None
    return {**config, "model": run.model}, source


def run_deviations(run: RunRecord, table: PaperTable, row: PaperRow) -> dict[str, tuple[Any, Any]]:
    """How a run differs from the row's experiment, in keys that can change its result (empty: a faithful run)."""
    trained, run_dir = training_config(run)
    if trained is None:
        return {"training config": ("not found", "the experiment's")}
    diffs = config_deviations(trained, experiment_config(table, row), run_dir)
    if run.kind == "eval":
        defaults = OmegaConf.to_container(OmegaConf.structured(EvalOptions))
        used = run.config.get("eval", {})
        for key in sorted(set(defaults) - EVAL_NEUTRAL):
            if key in used and not _same(used[key], defaults[key]):
                diffs[f"eval.{key}"] = (used[key], defaults[key])
    if run.split != table.split:
        diffs["measured split"] = (run.split, table.split)
    return diffs


def is_faithful(run: RunRecord, table: PaperTable, row: PaperRow) -> bool:
    """Is the run a run of the row's experiment (whole split, no result-changing difference)?"""
    return (run.dataset == table.dataset and run.config["data"].get("limit") is None
            and run.model.get("name") == row_config(row)["name"] and not run_deviations(run, table, row))


@cache
def complexity(model_json: str) -> tuple[float, float, float]:
    """(million mult-adds, million parameters, million conv+fc weights) of a model config (JSON), on meta tensors."""
    cfg = json.loads(model_json)
    with torch.device("meta"):
        s = summarize(create_model_from_config(cfg), cfg["resolution"])
    weights = sum(v["params"] for v in s["by_type"].values())
    return s["macs"] / 1e6, s["params"] / 1e6, weights / 1e6


def row_complexity(table: PaperTable, row: PaperRow) -> tuple[float, float]:
    """Our mult-adds and parameters (M) for a row, parameters counted as the table's paper counts them."""
    macs, params, weights = complexity(json.dumps(row_config(row), sort_keys=True))
    return macs, (weights if row.model.startswith("mobilenet") else params)


# ------------------------------------------------------------------------------------------------ tables


@dataclass
class Deviation:
    """A run of a row's model that is not a run of the row's experiment: never in ours, listed with its differences."""

    run: RunRecord
    diffs: dict[str, tuple[Any, Any]]  # key -> (the run's value, the experiment's value)


@dataclass
class RowResult:
    """One row of a generated table: the paper's figures, ours, and the runs behind ours."""

    row: PaperRow
    config: dict[str, Any]
    ours: dict[str, list[float]]  # metric -> one value per run
    madds_m: float
    params_m: float
    runs: list[RunRecord] = field(default_factory=list)
    deviating: list[Deviation] = field(default_factory=list)  # runs of the row's model left out of ours, and why


@dataclass
class TableResult:
    """A generated table and the evaluations of published weights that matched its rows (kept apart)."""

    table: PaperTable
    rows: list[RowResult]
    published: list[tuple[PaperRow, RunRecord]] = field(default_factory=list)
    latency: Latency | None = None  # the repro-bench report the latency columns read (tables printing latency)

    @property
    def id(self) -> str:
        """The table id (`resnet_table3`, ...)."""
        return self.table.id

    @property
    def missing(self) -> list[PaperRow]:
        """Rows with no run yet."""
        return [r.row for r in self.rows if not r.runs]

    def csv(self) -> str:
        """`<id>.csv`."""
        return table_csv(self)

    def markdown(self) -> str:
        """`<id>.md`."""
        return table_markdown(self)


def _pick_per_source(runs: list[RunRecord]) -> list[RunRecord]:
    """One record per trained model: its training run's own metrics, else its newest evaluation."""
    best: dict[Path, RunRecord] = {}
    for run in sorted(runs, key=lambda r: (r.kind == "train", str(r.path))):
        best[run.source] = run  # train records sort last, so they win; among evals the last path (newest) wins
    return sorted(best.values(), key=lambda r: str(r.path))


def build_table(table: PaperTable, runs: list[RunRecord], latency: Latency | None = None) -> TableResult:
    """Match runs to the table's rows and compute its columns.

    A finished run of a row's model on the table's dataset that measured the table's protocol on the whole split
    is ours when it is faithful to the row's experiment (`run_deviations` empty), else a deviating run of the
    closest row. Smoke tests (`data.limit`) and runs still training count nowhere.
    """
    result = TableResult(table, [], latency=latency)
    faithful: dict[str, list[RunRecord]] = {row.label: [] for row in table.rows}
    deviating: dict[str, list[Deviation]] = {row.label: [] for row in table.rows}
    for run in runs:
        if (run.metrics is None or run.dataset != table.dataset or run.config["data"].get("limit") is not None
                or run.value(table.protocol, table.metrics[0]) is None):
            continue
        if run.weights_format != "repro":  # published weights: matched on dataset, split and model, listed apart
            result.published += [(row, run) for row in table.rows if matches(run, table, row)]
            continue
        rows = [row for row in table.rows if row_config(row)["name"] == run.model.get("name")]
        diffs = {row.label: run_deviations(run, table, row) for row in rows}
        exact = [row for row in rows if not diffs[row.label]]
        for row in exact:
            faithful[row.label].append(run)
        if rows and not exact:
            closest = min(rows, key=lambda r: len(diffs[r.label]))
            deviating[closest.label].append(Deviation(run, diffs[closest.label]))
    for row in table.rows:
        ours_runs = _pick_per_source(faithful[row.label])
        kept = {id(r) for r in _pick_per_source([d.run for d in deviating[row.label]])}
        ours = {m: [v for r in ours_runs if (v := r.value(table.protocol, m)) is not None] for m in table.metrics}
        madds, params = row_complexity(table, row)
        result.rows.append(RowResult(row, row_config(row), ours, madds, params, ours_runs,
                                     [d for d in deviating[row.label] if id(d.run) in kept]))
    return result


def build_tables(runs: list[RunRecord], ids: Iterable[str] | None = None,
                 latency: Latency | None = None) -> list[TableResult]:
    """Every result table (or those in `ids`) with the runs matched (and the measured latency, where printed)."""
    wanted = set(ids) if ids is not None else None
    return [build_table(t, runs, latency) for t in RESULT_TABLES if wanted is None or t.id in wanted]


# ------------------------------------------------------------------------------------------------ latency
# The setting the tables read from a repro-bench report: ONNX Runtime, one thread, one image (as a phone CPU core).
LATENCY_SETTING = {"backend": "onnxruntime", "threads": 1, "batch_size": 1}
LATENCY_COMMAND = "python scripts/bench_latency.py"  # writes results/bench/latency.json (run it on an idle machine)


@dataclass
class Latency:
    """A repro-bench report (`{"machine", "results"}`) and the file it was read from."""

    path: Path
    machine: dict[str, Any]
    results: list[dict[str, Any]]

    def of(self, cfg: dict[str, Any], backend: str = "onnxruntime", threads: int = 1,
           batch_size: int = 1) -> float | None:
        """The median latency (ms) measured for model config `cfg` in this setting (the last record), or None."""
        found = [r["latency_ms"] for r in self.results
                 if r.get("backend") == backend and r.get("threads") == threads and r.get("batch_size") == batch_size
                 and isinstance(r.get("model_config"), dict)
                 and all(_same(r["model_config"].get(k), v) for k, v in cfg.items())]
        return found[-1] if found else None


def read_latency(path: str | Path | None) -> Latency | None:
    """The repro-bench report at `path`; None when there is no such file (the latency columns then show —)."""
    if path is None or not Path(path).is_file():
        return None
    data = _read_json(Path(path))
    if data is None or not isinstance(data.get("results"), list):
        raise RunsError(f"bench={path} is not a repro-bench report ({{\"machine\": ..., \"results\": [...]}}); "
                        f"write it with `repro-bench format=json` or `{LATENCY_COMMAND}`, or pass bench=null")
    return Latency(Path(path), data.get("machine") or {}, data["results"])


def latency_records(result: TableResult) -> list[dict[str, Any]]:
    """Per row: paper's and our latency (ms) and each divided by the table's first row's (MobileNetV1)."""
    ours = [result.latency.of(r.config, **LATENCY_SETTING) if result.latency else None for r in result.rows]
    paper = [r.row.paper.get("latency_ms") for r in result.rows]

    def ratio(v: float | None, base: float | None) -> float | None:
        return None if v is None or not base else v / base

    return [{"paper_latency_ms": p, "ours_latency_ms": o, "paper_latency_ratio": ratio(p, paper[0]),
             "ours_latency_ratio": ratio(o, ours[0])} for p, o in zip(paper, ours)]


def latency_note(result: TableResult) -> str:
    """Where our latency comes from (or how to measure it)."""
    s = LATENCY_SETTING
    if result.latency is None:
        return (f"Our latency (ONNX Runtime, {s['threads']} thread, batch {s['batch_size']}): — until a repro-bench "
                f"report exists; `{LATENCY_COMMAND}` writes results/bench/latency.json (on an idle machine).")
    m = result.latency.machine
    versions = m.get("versions") or {}
    return (f"Our latency: ONNX Runtime {versions.get('onnxruntime', '?')}, {s['threads']} thread, batch "
            f"{s['batch_size']}, median of timed calls, on {m.get('cpu', 'an unnamed CPU')} ({m.get('cpu_count', '?')} "
            f"cores), from {result.latency.path}; ÷ V1 = latency / {result.rows[0].row.label}'s.")


def option_keys(table: PaperTable) -> list[str]:
    """The option columns of a table: every model option one of its rows sets."""
    keys: list[str] = []
    for row in table.rows:
        keys += [k for k in row.kwargs if k not in keys]
    return keys


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than 2 values)."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _has(table: PaperTable, where: str, metric: str) -> bool:
    """Does any row print `metric` in `where` (paper or ref)?"""
    return any(metric in getattr(row, where) for row in table.rows)


def table_records(result: TableResult) -> list[dict[str, Any]]:
    """The CSV rows: row, model, options, resolution, paper_/ours_/diff_ per metric, runs and their paths."""
    table = result.table
    records = []
    lat = latency_records(result) if _has(table, "paper", "latency_ms") else None
    for i, r in enumerate(result.rows):
        rec: dict[str, Any] = {"row": r.row.label, "model": r.row.model}
        rec.update({k: r.config.get(k) for k in option_keys(table)})
        rec["resolution"] = r.config["resolution"]
        for m in table.metrics:
            mean, std = _mean_std(r.ours[m])
            paper = r.row.paper.get(m)
            rec.update({f"paper_{m}": paper, f"ours_{m}": mean, f"ours_{m}_std": std,
                        f"diff_{m}": None if mean is None or paper is None else mean - paper})
            if _has(table, "ref", m):
                rec[f"ref_{m}"] = r.row.ref.get(m)
        for m, ours in (("madds_m", r.madds_m), ("params_m", r.params_m)):
            paper = r.row.paper.get(m)
            rec.update({f"paper_{m}": paper, f"ours_{m}": ours, f"diff_{m}": None if paper is None else ours - paper})
            if _has(table, "ref", m):
                rec[f"ref_{m}"] = r.row.ref.get(m)
        if lat is not None:
            rec.update(lat[i])
        rec["runs"] = len(r.runs)
        rec["run"] = ";".join(str(run.path) for run in r.runs)
        rec["deviating_runs"] = len(r.deviating)
        rec["note"] = r.row.note
        records.append(rec)
    return records


def _csv_value(v: Any) -> Any:
    """Floats rounded to 4 decimals, None as an empty cell."""
    if v is None:
        return ""
    return round(v, 4) if isinstance(v, float) else v


def table_csv(result: TableResult) -> str:
    """`<id>.csv`."""
    records = table_records(result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_value(v) for k, v in rec.items()} for rec in records)
    return buf.getvalue()


METRIC_NAMES = {"top1_err": "top-1 err", "top5_err": "top-5 err", "top1_acc": "top-1 acc", "top5_acc": "top-5 acc",
                "madds_m": "mult-adds (M)", "params_m": "params (M)"}
PROTOCOL_NAMES = {"center": "single center crop", "ten_crop": "10-crop", "multi_scale": "multi-scale (fully conv)"}


def _fmt(v: float | None, digits: int = 2) -> str:
    """A number for the markdown table, `—` when missing."""
    return MISSING if v is None else f"{round(v, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.00"


def _fmt_value(v: Any) -> str:
    """A config value as written on the command line (null, true, 0.1, [a, b])."""
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


def reads_jpeg(run: RunRecord) -> bool:
    """Did the run read JPEG re-encodings of lossless originals (CIFAR)? Image folders of .jpg/.jpeg files where
    data.root exists (torchvision's pickled batches are the original pixels), else a data.root named jpeg/jpg."""
    data = run.config.get("data", {})
    root, spec = data.get("root"), SPECS.get(str(data.get("name", "")))
    if spec is None or not spec.jpeg_copies or not root:
        return False
    path = Path(root)
    if path.is_dir():
        if any(path.glob("cifar-*-batches-py")) or (path / "cifar-100-python").is_dir():
            return False
        for split in ("test", "train"):
            classes = sorted(d for d in (path / split).glob("*") if d.is_dir()) if (path / split).is_dir() else []
            for cls in classes:
                first = next((f for f in sorted(cls.iterdir()) if f.is_file()), None)
                if first is not None:
                    return first.suffix.lower() in (".jpg", ".jpeg")
    return bool(re.search(r"jpe?g", path.name, re.IGNORECASE))


def data_notes(result: TableResult) -> list[str]:
    """A note when our runs read JPEG re-encodings of CIFAR rather than the original images."""
    rows = [r.row.label for r in result.rows if any(reads_jpeg(run) for run in r.runs)]
    if not rows:
        return []
    dataset = result.table.dataset
    name = SPECS[dataset].title if dataset in SPECS else dataset
    return [f"Data: our runs of {', '.join(rows)} read JPEG re-encodings of {name} (image folders), not the original "
            f"images; JPEG is lossy (small images lose much of their detail), so these numbers compare with runs on "
            f"the same files more than with the paper's: a model trained on the originals scores far worse on JPEG "
            f"copies (see the README)."]


def _fmt_option(v: Any) -> str:
    """An option value for the markdown table."""
    return "" if v is None else str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)


def table_markdown(result: TableResult) -> str:
    """`<id>.md`: caption, source, the table (paper beside ours), notes and how to fill missing rows."""
    table = result.table
    opts = option_keys(table)
    head = ["model", *opts, "res"]
    for m in table.metrics:
        head += [f"{METRIC_NAMES[m]} paper", "ours", "Δ"] + (["ref"] if _has(table, "ref", m) else [])
    head += ["mult-adds (M) paper", "ours", "params (M) paper", "ours"]
    latency = _has(table, "paper", "latency_ms")
    head += (["latency (ms) paper", "ours", "÷ V1 paper", "ours"] if latency else []) + ["runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(head))) + "|"]
    for r, rec in zip(result.rows, table_records(result)):
        cells = [r.row.label, *(_fmt_option(rec[k]) for k in opts), str(rec["resolution"])]
        for m in table.metrics:
            mean, std = rec[f"ours_{m}"], rec[f"ours_{m}_std"]
            ours = _fmt(mean) + (f" ± {std:.2f}" if std is not None else "")
            cells += [_fmt(rec[f"paper_{m}"]), ours, _fmt(rec[f"diff_{m}"])]
            if _has(table, "ref", m):
                cells.append(_fmt(rec[f"ref_{m}"]))
        cells += [_fmt(rec["paper_madds_m"], 0) if rec["paper_madds_m"] is None or rec["paper_madds_m"] >= 100
                  else _fmt(rec["paper_madds_m"], 1), f"{r.madds_m:.1f}",
                  _fmt(rec["paper_params_m"]), f"{r.params_m:.2f}"]
        if latency:
            cells += [_fmt(rec["paper_latency_ms"], 0), _fmt(rec["ours_latency_ms"], 1),
                      _fmt(rec["paper_latency_ratio"]), _fmt(rec["ours_latency_ratio"])]
        cells.append(str(rec["runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    out = [f"## `{table.id}`: {table.caption}", "", f"Source: {table.source}. Measured on {table.dataset} "
           f"{table.split}, {PROTOCOL_NAMES[table.protocol]} testing. Δ = ours − paper.", "", *lines, ""]
    notes = list(table.notes) + [f"{r.row.label}: {r.row.note}." for r in result.rows if r.row.note]
    if table.ref_name:
        notes.append(f"ref = {table.ref_name}.")
    params = "conv and fc weights (as MobileNet Table 2 counts)" if table.rows[0].model.startswith(
        "mobilenet") else "all learnable parameters"
    notes.append(f"Our mult-adds and parameters are counted from the models (parameters: {params}); "
                 f"ours ± is the standard deviation over runs (runs = how many).")
    notes += data_notes(result)
    if latency:
        notes.append(latency_note(result))
    for row, run in result.published:
        vals = ", ".join(f"{METRIC_NAMES[m]} {_fmt(run.value(table.protocol, m))}" for m in table.metrics)
        notes.append(f"Published weights ({run.weights_format}) evaluated as {row.label}: {vals} ({run.path}).")
    out += [f"- {n}" for n in notes] + [""]
    deviating = [(r.row, d) for r in result.rows for d in r.deviating]
    if deviating:
        out += ["Deviating runs (not in ours: their config differs from the row's experiment in keys that can "
                "change the result; shown as key=run's value (experiment's value)):", ""]
        for row, d in deviating:
            vals = ", ".join(f"{METRIC_NAMES[m]} {_fmt(d.run.value(table.protocol, m))}" for m in table.metrics)
            keys = "; ".join(f"{k}={_fmt_value(a)} ({_fmt_value(b)})" for k, (a, b) in d.diffs.items())
            out.append(f"- {row.label}: {vals} ({d.run.path}): {keys}")
        out.append("")
    commands = reproduce_commands(result)
    if commands:
        what = "all rows" if len(result.missing) == len(table.rows) else ", ".join(r.label for r in result.missing)
        out += [f"Missing ({what}): reproduce with", "", "```bash", *commands, "```", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ commands

@cache
def _sweep_params(experiment: str) -> dict[str, list[str]]:
    """The sweep of `configs/experiment/<experiment>.yaml`: key -> values as written."""
    path = Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml"
    if not path.is_file():  # an ad-hoc table with no experiment file
        return {}
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params", default={}) or {}
    return {k: [v.strip() for v in str(vals).split(",")] for k, vals in params.items()}


def _covered(experiment: str, select: dict[str, Any]) -> bool:
    """Does the experiment's own sweep run the row that `select` picks?"""
    sweep = _sweep_params(experiment)
    return all(k in sweep and any(_same_value(v, s) for s in sweep[k]) for k, v in select.items())


def _same_value(value: Any, written: str) -> bool:
    """A sweep value as written in YAML against a row's select value (0.75 vs '0.75', 1.0 vs '1.0')."""
    try:
        return float(written) == float(value)
    except (TypeError, ValueError):
        return str(value) == written


def reproduce_commands(result: TableResult) -> list[str]:
    """`repro-train -m experiment=...` commands that train exactly the table's missing rows."""
    table = result.table
    missing = result.missing
    if not missing:
        return []
    root = f"data.root=/path/to/{table.dataset}"
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in missing:
        select = dict(row.select)
        groups.setdefault(select.pop("experiment", table.experiment), []).append(select)
    commands = []
    for experiment, selects in groups.items():
        covered = [s for s in selects if _covered(experiment, s)]
        rest = [s for s in selects if not _covered(experiment, s)]
        n_swept = 1
        for values in _sweep_params(experiment).values():
            n_swept *= len(values)
        if covered and len(covered) == n_swept:  # every job of the experiment's sweep is missing
            commands.append(f"repro-train -m experiment={experiment} {root}")
        elif covered and all(set(s) == {"row"} for s in covered):
            commands.append(f"repro-train -m experiment={experiment} row={','.join(s['row'] for s in covered)} {root}")
        else:
            rest = covered + rest
        for s in rest:
            overrides = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items())
            commands.append(f"repro-train -m experiment={experiment} {overrides} {root}")
    if table.protocol == "multi_scale" and not any("multi_scale" in _final_protocols(e) for e in groups):
        commands.append("# then: repro-eval weights.path=<run dir>/checkpoints/last.pt eval.protocols=[multi_scale]")
    return commands


@cache
def _final_protocols(experiment: str) -> tuple[str, ...]:
    """The protocols an experiment's runs measure at the end."""
    path = Path(CONFIG_DIR) / "experiment" / f"{experiment}.yaml"
    return tuple(OmegaConf.load(path).get("final_protocols", ["center"])) if path.is_file() else ("center",)


# ------------------------------------------------------------------------------------------------ pages


def status_lines(pages: list[Any], prefix: str = "") -> list[str]:
    """A one-line-per-table summary: rows with runs, and ours − paper on the primary metric where measured."""
    lines = ["| table | source | what | rows with runs | ours − paper (primary metric) |", "|---|---|---|--:|---|"]
    for page in pages:
        link = f"[`{page.id}`]({prefix}{page.id}.md)"
        if isinstance(page, ComputeTable):
            lines.append(f"| {link} | {page.source} | {page.caption.rstrip('.')} | computed | "
                         "counted from the models; no runs needed |")
            continue
        t = page.table
        m = t.metrics[0]
        done = sum(1 for r in page.rows if r.runs)
        diffs = [f"{r.row.label} {statistics.fmean(r.ours[m]) - r.row.paper[m]:+.2f}"
                 for r in page.rows if r.ours[m] and m in r.row.paper]
        lines.append(f"| {link} | {t.source.split(';')[0].split(' (')[0]} | {t.caption.rstrip('.')} | "
                     f"{done}/{len(t.rows)} | {', '.join(diffs) or MISSING} |")
    return lines


def results_page(pages: list[Any], extra: list[str] | None = None) -> str:
    """RESULTS.md: a status summary, then every table with how to reproduce its missing rows."""
    out = ["# Results: the papers' tables, paper beside ours", "",
           "Generated by `repro-tables`; do not edit by hand. Accuracy columns show `—` until a run of the row exists;",
           "mult-adds and parameters are counted from our models.", "", *status_lines(pages), ""]
    out += extra or []
    for page in pages:
        out += [page.markdown(), ""]
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ compute-only tables


@dataclass
class ComputeTable:
    """A table every column of which is counted from the models (MobileNet Tables 2 and 3)."""

    id: str
    caption: str
    source: str
    records: list[dict[str, Any]]
    notes: list[str]
    missing: list[PaperRow] = field(default_factory=list)  # nothing to train

    def csv(self) -> str:
        """`<id>.csv`."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(self.records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _csv_value(v) for k, v in rec.items()} for rec in self.records)
        return buf.getvalue()

    def markdown(self) -> str:
        """`<id>.md`: every column, paper beside ours."""
        keys = [k for k in self.records[0] if k != "note"]
        lines = ["| " + " | ".join(keys) + " |", "|---" + "|--:" * (len(keys) - 1) + "|"]
        for rec in self.records:
            lines.append("| " + " | ".join(_fmt(v) if isinstance(v, float) or v is None else str(v)
                                           for v in (rec[k] for k in keys)) + " |")
        notes = self.notes + [f"{rec['row']}: {rec['note']}." for rec in self.records if rec.get("note")]
        return "\n".join([f"## `{self.id}`: {self.caption}", "", f"Source: {self.source}. No training needed: "
                          "every figure is counted from the models.", "", *lines, "", *(f"- {n}" for n in notes), ""])


def mobilenet_table2() -> ComputeTable:
    """MobileNet Table 2: share of mult-adds and of parameters by layer type, 1.0 MobileNet-224."""
    from repro.report.reference import MOBILENET, MOBILENET_TABLE2, MOBILENET_TABLE2_MISPRINTS

    with torch.device("meta"):
        s = summarize(create_model_from_config(_model_defaults("mobilenet_v1")), 224)
    total_macs = sum(v["macs"] for v in s["by_type"].values())
    total_w = sum(v["params"] for v in s["by_type"].values())
    names = {"conv1x1": "Conv 1x1", "conv3x3_dw": "Conv DW 3x3", "conv3x3": "Conv 3x3", "fc": "Fully Connected"}
    records = []
    for kind, (pct_macs, pct_params) in MOBILENET_TABLE2.items():
        ours_macs = 100 * s["by_type"][kind]["macs"] / total_macs
        ours_params = 100 * s["by_type"][kind]["params"] / total_w
        fixed = MOBILENET_TABLE2_MISPRINTS.get((kind, "madds"))
        records.append({"row": names[kind], "model": "mobilenet_v1", "paper_madds_pct": pct_macs,
                        "ours_madds_pct": ours_macs, "diff_madds_pct": ours_macs - pct_macs,
                        "paper_params_pct": pct_params, "ours_params_pct": ours_params,
                        "diff_params_pct": ours_params - pct_params,
                        "note": f"the printed {pct_macs}% is a misprint of {fixed}% (digits swapped)" if fixed else ""})
    return ComputeTable("mobilenet_table2", "Resource per layer type, 1.0 MobileNet-224 (% of mult-adds, % of "
                        "parameters).", f"{MOBILENET}, Table 2", records,
                        ["Parameters are conv and fc weights (no biases, no BN), as the paper counts them."])


def mobilenet_table3() -> ComputeTable:
    """MobileNet Table 3: one 14x14x512 layer as a full conv, separable, thinned (alpha) and shrunk (rho)."""
    from repro.models.mobilenet import ConvBNAct, depthwise_separable
    from repro.report.complexity import profile
    from repro.report.reference import MOBILENET, MOBILENET_TABLE3

    layers = {"Conv 3x3": (lambda: ConvBNAct(512, 512, 3), 512, 14),
              "Depthwise Separable Conv": (lambda: depthwise_separable(512, 512, 1), 512, 14),
              "alpha = 0.75": (lambda: depthwise_separable(384, 384, 1), 384, 14),
              "rho = 0.714": (lambda: depthwise_separable(384, 384, 1), 384, 10)}
    records = []
    for label, (paper_macs, paper_params) in MOBILENET_TABLE3.items():
        build, channels, size = layers[label]
        with torch.device("meta"):
            prof = profile(build(), size, channels)
        macs, weights = sum(x.macs for x in prof) / 1e6, sum(x.weights for x in prof) / 1e6
        records.append({"row": label, "model": f"{channels} channels at {size}x{size}", "paper_madds_m": paper_macs,
                        "ours_madds_m": macs, "diff_madds_m": macs - paper_macs, "paper_params_m": paper_params,
                        "ours_params_m": weights, "diff_params_m": weights - paper_params})
    return ComputeTable("mobilenet_table3", "Resource usage for modifications to standard convolution: one "
                        "14x14x512 layer, stride 1 (million mult-adds, million parameters).", f"{MOBILENET}, Table 3",
                        records, ["rho = 0.714 is applied on top of alpha = 0.75 (384 channels at 10x10)."])
