"""Measure the MobileNet latency grid for `repro-tables`: results/bench/latency.json.

Every MobileNetV1 width x resolution of the papers' grid (alpha 1, 0.75, 0.5, 0.25 x rho 224, 192, 160, 128) and the
MobileNetV2 widths (1.4, 1.3, 1.0, 0.75, 0.5, 0.35 at 224; `--v2-grid` adds V2's resolutions 192 ... 96), each with
`repro-bench` (the same configs and code: `repro-bench model=mobilenet_v1 model.width_mult=A model.resolution=R
bench.backends=[eager,onnxruntime] bench.threads=1 bench.batch_sizes=[1]`), one model after another in this
process, merged into one report `{"machine": {...}, "results": [...]}`.

Run it on an idle machine (nothing else using the cores): latency measured beside a training run is distorted.

    pip install -e '.[export]'
    python scripts/bench_latency.py                       # ~10 minutes on 2 cores; prints the README table
    python scripts/bench_latency.py --table results/bench/latency.json   # the README table again, no measuring
    repro-tables out=results readme=README.md             # MobileNetV2 Table 4 latency columns + latency figure
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from repro.bench import format_table, run_bench
from repro.cli import CONFIG_DIR
from repro.config import register_configs

V1_WIDTHS, V1_RESOLUTIONS = (1.0, 0.75, 0.5, 0.25), (224, 192, 160, 128)
V2_WIDTHS, V2_RESOLUTIONS = (1.4, 1.3, 1.0, 0.75, 0.5, 0.35), (224, 192, 160, 128, 96)
V2_GRID_WIDTHS = (1.0, 0.75, 0.5, 0.35)  # the widths TF-slim released at every resolution


def grid(v2_grid: bool = False) -> list[tuple[str, float, int]]:
    """(model, width, resolution) of every model measured."""
    points = [("mobilenet_v1", a, r) for a in V1_WIDTHS for r in V1_RESOLUTIONS]
    points += [("mobilenet_v2", a, 224) for a in V2_WIDTHS]
    if v2_grid:
        points += [("mobilenet_v2", a, r) for a in V2_GRID_WIDTHS for r in V2_RESOLUTIONS[1:]]
    return points


def bench_config(model: str, width: float, resolution: int, args: argparse.Namespace) -> DictConfig:
    """The config `repro-bench` runs with for one grid point."""
    overrides = [f"model={model}", f"model.width_mult={width}", f"model.resolution={resolution}",
                 f"bench.backends=[{','.join(args.backends)}]", f"bench.threads={args.threads}",
                 f"bench.batch_sizes=[{','.join(map(str, args.batch_sizes))}]", f"bench.warmup={args.warmup}",
                 f"bench.iters={args.iters}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("bench", overrides=overrides)


def median_of_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Each measurement of the first round with latency_ms and latency_ms_p90 the medians over the rounds (and
    images_per_s from that median), plus the per-round medians as "rounds_ms"."""
    merged = []
    for i, rec in enumerate(rounds[0]):
        runs = [rnd[i] for rnd in rounds]
        med = statistics.median(r["latency_ms"] for r in runs)
        merged.append({**rec, "latency_ms": med, "latency_ms_p90": statistics.median(r["latency_ms_p90"] for r in runs),
                       "images_per_s": rec["batch_size"] * 1000.0 / med, "rounds_ms": [r["latency_ms"] for r in runs]})
    return merged


def markdown_table(report: dict) -> str:
    """The README's latency table: per model eager and ONNX Runtime latency (batch 1), ORT's speed-up, and ORT
    latency and mult-adds as multiples of 1.0 MobileNetV1-224's (the papers' proxy against the measurement)."""
    from repro.report.results import complexity

    by_model: dict[str, dict] = {}
    for rec in report["results"]:
        if rec["batch_size"] != 1:
            continue
        key = json.dumps(rec["model_config"], sort_keys=True)
        by_model.setdefault(key, {"cfg": rec["model_config"]})[rec["backend"]] = rec["latency_ms"]
    rows = list(by_model.values())
    base = next((r for r in rows if r["cfg"]["name"] == "mobilenet_v1" and r["cfg"]["width_mult"] == 1.0
                 and r["cfg"]["resolution"] == 224), None)
    base_macs = complexity(json.dumps(base["cfg"], sort_keys=True))[0] if base else None
    m = report["machine"]
    lines = [f"Measured on {m['cpu']} ({m['cpu_count']} cores), {m['threads']} thread, batch 1, median of timed "
             f"calls; torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}.", "",
             "| model | width | res | mult-adds (M) | eager (ms) | ONNX Runtime (ms) | ORT speed-up | "
             "ORT ÷ V1 1.0-224 | mult-adds ÷ V1 1.0-224 |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]

    def fmt(v: float | None, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    for r in rows:
        cfg, eager, ort = r["cfg"], r.get("eager"), r.get("onnxruntime")
        macs = complexity(json.dumps(cfg, sort_keys=True))[0]
        speedup = eager / ort if eager and ort else None
        ratio = ort / base["onnxruntime"] if ort and base and base.get("onnxruntime") else None
        lines.append(f"| {cfg['name']} | {cfg['width_mult']:g} | {cfg['resolution']} | {macs:.0f} | "
                     f"{fmt(eager, '.1f')} | {fmt(ort, '.1f')} | {fmt(speedup, '.2f')} | {fmt(ratio, '.2f')} | "
                     f"{fmt(macs / base_macs if base_macs else None, '.2f')} |")
    return "\n".join(lines)


def main() -> None:
    """Benchmark the grid and write the merged report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/bench/latency.json")
    parser.add_argument("--backends", nargs="+", default=["eager", "onnxruntime"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the grid; each point's median over them")
    parser.add_argument("--v2-grid", action="store_true", help="also V2's 1.0/0.75/0.5/0.35 at 192, 160, 128, 96")
    parser.add_argument("--table", metavar="REPORT", help="only print the README table of an existing report")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    register_configs()
    machine, rounds = None, []
    for r in range(args.rounds):  # whole passes over the grid, so a slow spell of a shared machine hits one pass
        results = []
        for model, width, resolution in grid(args.v2_grid):
            report = run_bench(bench_config(model, width, resolution, args))
            print(f"round {r + 1}/{args.rounds}\n" + format_table(report) + "\n", flush=True)
            machine = machine or report["machine"]
            results += report["results"]
        rounds.append(results)
    results = median_of_rounds(rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    tmp.replace(out)
    print(markdown_table({"machine": machine, "results": results}) + "\n")
    print(f"{len(results)} measurements written to {out}; now: repro-tables out=results readme=README.md")


if __name__ == "__main__":
    main()
