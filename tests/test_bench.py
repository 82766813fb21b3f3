"""repro-bench: the JSON report's schema, latency against batch size, statistics; the latency columns of
MobileNetV2 Table 4 and the latency figure, read from a bench report."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from repro.bench import summarize_times
from repro.cli import CONFIG_DIR
from repro.config import register_configs
from repro.export import EXTRA_INSTALL
from repro.report.figures import write_figures
from repro.report.reference import RESULT_TABLES
from repro.report.results import MISSING, build_tables, read_latency, table_csv, table_markdown
from repro.tables import generate

TABLES = {t.id: t for t in RESULT_TABLES}
RESULT_KEYS = {"model", "backend", "batch_size", "threads", "latency_ms", "latency_ms_p90", "images_per_s"}


def test_json_schema_and_latency_grows_with_batch(repro_bench, tmp_path):
    """format=json prints only the report; every backend x batch size has the issue's fields, p90 >= median,
    images/s = batch / median, and 64 images take longer than one."""
    pytest.importorskip("onnxruntime", reason=f"the export extra is not installed ({EXTRA_INSTALL})")
    r = repro_bench("model=resnet20", "bench.backends=[eager,onnxruntime]", "bench.batch_sizes=[1,64]",
                    "bench.threads=1", "bench.warmup=2", "bench.iters=7", "format=json", "hydra.run.dir=run",
                    cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout)  # the whole of stdout is the JSON: logs went to stderr
    assert set(report) == {"machine", "results"}
    m = report["machine"]
    assert m["threads"] == 1 and m["torch_threads"] == 1 and m["cpu"] and m["cpu_count"] >= 1
    assert m["versions"]["torch"] and m["versions"]["onnxruntime"]
    got = {(x["backend"], x["batch_size"]): x for x in report["results"]}
    assert set(got) == {("eager", 1), ("eager", 64), ("onnxruntime", 1), ("onnxruntime", 64)}
    for (_, n), x in got.items():
        assert RESULT_KEYS <= set(x) and x["model"] == "resnet20" and x["threads"] == 1
        assert x["model_config"]["name"] == "resnet20" and x["model_config"]["resolution"] == 32
        assert 0 < x["latency_ms"] <= x["latency_ms_p90"]
        assert x["images_per_s"] == pytest.approx(n * 1000 / x["latency_ms"], rel=1e-3)
    for backend in ("eager", "onnxruntime"):
        assert got[(backend, 64)]["latency_ms"] > got[(backend, 1)]["latency_ms"]
    assert json.loads((tmp_path / "run" / "bench.json").read_text()) == report


def test_table_format_and_executorch(repro_bench, tmp_path):
    """format=table prints one row per backend and batch; ExecuTorch (XNNPACK) runs where it is installed."""
    pytest.importorskip("executorch", reason="ExecuTorch is not installed (pip install -e '.[executorch]')")
    r = repro_bench("model=resnet20", "bench.backends=[executorch]", "bench.batch_sizes=[1]", "bench.warmup=1",
                    "bench.iters=3", "hydra.run.dir=run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("resnet20 (") and "1 thread(s)" in lines[0]
    rows = [ln.split() for ln in lines if ln.startswith("executorch")]
    assert [int(row[1]) for row in rows] == [1] and all(float(row[2]) > 0 for row in rows)


@pytest.mark.parametrize("args, message", [
    (["bench.backends=[tflite]"], "bench.backends[0]='tflite' is not valid; choose one of ['eager', 'compile', "
                                  "'onnxruntime', 'executorch']"),
    (["bench.batch_sizes=[0]"], "bench.batch_sizes=[0] is not valid"),
    (["bench.threads=0"], "bench.threads=0 is not valid"),
    (["format=csv"], "format='csv' is not valid"),
])
def test_bad_options_are_refused(args, message, repro_bench, tmp_path):
    """Bad options stop the command before any work, naming the valid choices."""
    r = repro_bench("model=resnet20", *args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-1000:]


@pytest.mark.parametrize("backend, module, install", [("executorch", "executorch", "pip install -e '.[executorch]'"),
                                                      ("onnxruntime", "onnxruntime", "pip install -e '.[export]'")])
def test_missing_backend_names_its_install(backend, module, install, repro_bench, tmp_path, monkeypatch):
    """A backend whose package is absent stops the command, naming the command that installs it."""
    import sys

    for name in [module, *(m for m in sys.modules if m.startswith(module + "."))]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import <module>[.sub]` raise ImportError
    r = repro_bench("model=resnet20", f"bench.backends=[{backend}]", cwd=tmp_path)
    assert r.returncode == 2 and f"bench.backends=[{backend}] needs" in r.stderr and install in r.stderr


def test_statistics_by_hand():
    """Median and linearly interpolated 90th percentile of 1..10 ms: 5.5 and 9.1; 4 images at 5.5 ms: 727.27/s."""
    s = summarize_times([float(t) for t in (10, 3, 1, 2, 9, 4, 5, 6, 8, 7)], 4)
    assert s == {"latency_ms": 5.5, "latency_ms_p90": 9.1, "images_per_s": round(4000 / 5.5, 2)}


# ------------------------------------------------------------------------------------------------ tables


def bench_model_config(*overrides: str) -> dict:
    """The model config repro-bench records for these overrides (its own config composition)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("bench", overrides=list(overrides))
    return OmegaConf.to_container(cfg.model, resolve=True)


def record(cfg: dict, ms: float, backend: str = "onnxruntime", threads: int = 1, batch: int = 1) -> dict:
    """One result of a bench report."""
    return {"model": cfg["name"], "backend": backend, "batch_size": batch, "threads": threads, "latency_ms": ms,
            "latency_ms_p90": ms * 1.1, "images_per_s": batch * 1000 / ms, "model_config": cfg}


@pytest.fixture
def bench_file(tmp_path) -> Path:
    """A bench report: V1 12.0 ms, V2 9.8 ms, V2 (1.4) 15.0 ms under ORT, 1 thread, batch 1 (the table's setting),
    plus measurements the table must not read (eager, 2 threads, batch 64) and a V1 grid point (0.5-160)."""
    v1, v2 = bench_model_config("model=mobilenet_v1"), bench_model_config("model=mobilenet_v2")
    v2_14 = bench_model_config("model=mobilenet_v2", "model.width_mult=1.4")
    v1_half = bench_model_config("model=mobilenet_v1", "model.width_mult=0.5", "model.resolution=160")
    results = [record(v1, 28.3, backend="eager"), record(v1, 12.0), record(v1, 7.0, threads=2),
               record(v1, 300.0, batch=64), record(v2, 30.6, backend="eager"), record(v2, 9.8),
               record(v2_14, 15.0), record(v1_half, 3.0)]
    path = tmp_path / "latency.json"
    path.write_text(json.dumps({"machine": {"cpu": "Test CPU 9000", "cpu_count": 2, "threads": 1,
                                            "versions": {"onnxruntime": "1.0"}}, "results": results}))
    return path


def test_table4_latency_columns_from_a_bench_report(bench_file):
    """paper_latency_ms 113/75/143 and their ratios to V1; ours from the report's ORT/1-thread/batch-1 records."""
    (result,) = build_tables([], ["mobilenetv2_table4"], read_latency(bench_file))
    rows = list(csv.DictReader(io.StringIO(table_csv(result))))
    assert [float(r["paper_latency_ms"]) for r in rows] == [113, 75, 143]
    assert [float(r["ours_latency_ms"]) for r in rows] == [12.0, 9.8, 15.0]
    assert [float(r["paper_latency_ratio"]) for r in rows] == [1.0, round(75 / 113, 4), round(143 / 113, 4)]
    assert [float(r["ours_latency_ratio"]) for r in rows] == [1.0, round(9.8 / 12, 4), 1.25]
    md = table_markdown(result)
    assert "| latency (ms) paper | ours | ÷ V1 paper | ours | runs |" in md
    assert "| 113 | 12.0 | 1.00 | 1.00 | 0 |" in md and "| 75 | 9.8 | 0.66 | 0.82 | 0 |" in md
    assert "| 143 | 15.0 | 1.27 | 1.25 | 0 |" in md
    assert "Test CPU 9000" in md and str(bench_file) in md and "183 ms" in md  # the machine, the file, NasNet-A


def test_table4_without_a_bench_report_shows_missing():
    """No report: our latency columns are — and the note names the command that measures them."""
    (result,) = build_tables([], ["mobilenetv2_table4"], read_latency("no/such/latency.json"))
    rows = list(csv.DictReader(io.StringIO(table_csv(result))))
    assert [r["ours_latency_ms"] for r in rows] == ["", "", ""] and rows[1]["paper_latency_ratio"] == "0.6637"
    md = table_markdown(result)
    assert f"| 75 | {MISSING} | 0.66 | {MISSING} |" in md and "python scripts/bench_latency.py" in md
    assert "latency" not in table_csv(build_tables([], ["mobilenetv2_grid"])[0])  # only Table 4 prints latency


def test_bad_bench_report_is_refused(tmp_path):
    """A file that is not a repro-bench report is refused naming how to write one."""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="is not a repro-bench report"):
        read_latency(bad)


def test_tables_cli_path_and_latency_figure(bench_file, tmp_path):
    """repro-tables' generate() reads bench=, writes the columns, and draws the measured models in the latency
    figure: accuracy (paper / TF-slim) against latency, latency against our mult-adds."""
    (tmp_path / "runs").mkdir()
    pages = generate([str(tmp_path / "runs")], tmp_path / "out", ["mobilenetv2_table4"], figures=False,
                     bench=bench_file)
    assert "| 75 | 9.8 | 0.66 | 0.82 |" in (tmp_path / "out" / "mobilenetv2_table4.md").read_text()
    assert pages[0].latency is not None
    grids = build_tables([], ["mobilenet_grid", "mobilenetv2_grid"])
    drawn = write_figures(grids, [], tmp_path / "fig", fig7_images=1, latency=read_latency(bench_file))
    plot = drawn["mobilenet_latency.png"]
    assert plot.runs == 4 and (tmp_path / "fig" / "figures" / "mobilenet_latency.png").is_file()
    left, right = plot.figure.axes
    points = {c.get_gid(): sorted(map(tuple, c.get_offsets().tolist())) for c in left.collections}
    # V1 1.0-224 (paper 70.6%) and 0.5-160 (TF-slim 59.1%); V2 1.0-224 (paper 72.0%) and 1.4-224 (paper 74.7%).
    assert points == {"MobileNetV1": [(3.0, 59.1), (12.0, 70.6)], "MobileNetV2": [(9.8, 72.0), (15.0, 74.7)]}
    x_madds = sorted(x for c in right.collections for x, _ in c.get_offsets().tolist())
    assert x_madds[0] == pytest.approx(76, abs=1) and x_madds[-1] == pytest.approx(582.2, abs=0.1)


def test_grid_script_measures_every_table_row(tmp_path):
    """scripts/bench_latency.py composes repro-bench configs whose records the tables find: every MobileNetV1 grid
    row and Table 4's rows; its README table gives ORT's speed-up and the ratios to 1.0 MobileNetV1-224."""
    import argparse
    import runpy

    from repro.report.results import Latency

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "bench_latency.py"))
    points = script["grid"]()
    assert len(points) == 16 + 6 and len(set(points)) == len(points)
    args = argparse.Namespace(backends=["eager", "onnxruntime"], threads=1, batch_sizes=[1], warmup=1, iters=1)
    register_configs()
    configs = [OmegaConf.to_container(script["bench_config"](*p, args).model, resolve=True) for p in points]
    latency = Latency(tmp_path, {}, [record(cfg, float(i + 1)) for i, cfg in enumerate(configs)])
    for table_id in ("mobilenet_grid", "mobilenetv2_table4"):
        (result,) = build_tables([], [table_id], latency)
        assert all(latency.of(r.config) is not None for r in result.rows), table_id
    report = {"machine": {"cpu": "Test CPU", "cpu_count": 2, "threads": 1,
                          "versions": {"torch": "2", "onnxruntime": "1"}},
              "results": [record(configs[0], 12.0), record(configs[0], 30.0, backend="eager"),
                          record(configs[16 + 2], 9.0), record(configs[16 + 2], 27.0, backend="eager")]}
    table = script["markdown_table"](report).splitlines()
    assert table[0].startswith("Measured on Test CPU (2 cores), 1 thread, batch 1")
    assert table[4] == "| mobilenet_v1 | 1 | 224 | 569 | 30.0 | 12.0 | 2.50 | 1.00 | 1.00 |"
    assert table[5] == "| mobilenet_v2 | 1 | 224 | 301 | 27.0 | 9.0 | 3.00 | 0.75 | 0.53 |"

    # Three rounds: each point reports the median of its round medians (a slow spell in one round does not count).
    rounds = [[{**record(configs[0], ms), "latency_ms_p90": ms + 1}] for ms in (12.0, 30.0, 11.0)]
    (merged,) = script["median_of_rounds"](rounds)
    assert (merged["latency_ms"], merged["latency_ms_p90"], merged["rounds_ms"]) == (12.0, 13.0, [12.0, 30.0, 11.0])
    assert merged["images_per_s"] == pytest.approx(1000 / 12.0)


def test_executorch_computes_what_pytorch_computes(tmp_path):
    """The XNNPACK-lowered program gives akamaster's ResNet-20 logits (within 1e-4) and top-1 classes."""
    pytest.importorskip("executorch", reason="ExecuTorch is not installed (pip install -e '.[executorch]')")
    import torch

    from common import AKAMASTER_DIR
    from repro.bench import executorch_runner
    from repro.models import create_model, load_weights

    weights = AKAMASTER_DIR / "resnet20-12fca82f.th"
    if not weights.is_file():
        pytest.skip(f"published weights absent: {weights}")
    model = load_weights(create_model("resnet20", shortcut_pad="split"), weights, "akamaster").eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    got = executorch_runner(model, 1, tmp_path)(x)()[0]
    with torch.no_grad():
        ref = model(x)
    assert ref.abs().max() > 1 and (got - ref).abs().max() <= 1e-4 and torch.equal(got.argmax(1), ref.argmax(1))
