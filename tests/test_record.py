"""scripts/record_run.py: a finished run becomes a record (results/runs/<experiment>/<row>/seed<N>/) whose model.pt
repro-eval scores exactly as the run reported, and which repro-tables reads."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from common import CIFAR_ROOT, ROOT
from repro.eval import main as eval_main
from repro.train import main as train_main

spec = importlib.util.spec_from_file_location("record_run", ROOT / "scripts" / "record_run.py")
record_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record_run)


def test_record_of_a_finished_run_evaluates_to_its_metrics(in_process, tmp_path):
    """A 2-step run of Table 6's ResNet-20 experiment (256-image samples of the CIFAR-10 JPEGs) recorded: the record
    holds the listed files and no optimizer state; repro-eval of its model.pt on the run's test split gives the
    run's metrics.json figures; an existing record is kept, and a run without metrics.json is refused."""
    if not (CIFAR_ROOT / "test").is_dir():
        pytest.skip(f"CIFAR-10 train/ and test/ images not found in {CIFAR_ROOT}")
    cwd = tmp_path
    res = in_process(train_main, "repro-train", "experiment=resnet_table6", "row=cifar_resnet20",
                     f"data.root={CIFAR_ROOT}", "data.limit=256", "data.num_workers=0", "trainer.max_steps=2",
                     "trainer.progress=false", "name=r20", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    run = cwd / "outputs" / "train" / "r20"
    out = record_run.record(run, cwd / "records")
    assert out == cwd / "records" / "resnet_table6" / "cifar_resnet20" / "seed0"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.json", "config.yaml", "run.json", "metrics.jsonl", "train.log", "tb", "model.pt"])
    model = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert set(model) == {"model", "ema", "config", "preprocessing", "git_commit", "steps"}
    last = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(v, last["model"][k]) for k, v in model["model"].items())
    metrics = json.loads((run / "metrics.json").read_text())
    res = in_process(eval_main, "repro-eval", f"weights.path={out / 'model.pt'}", "eval.progress=false",
                     "hydra.run.dir=outputs/eval/record", cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((cwd / "outputs" / "eval" / "record" / "metrics.json").read_text())
    assert again["center"] == metrics["center"] and metrics["center"]["images"] == 256
    with pytest.raises(ValueError, match="exists; pass --force"):
        record_run.record(run, cwd / "records")
    (run / "metrics.json").unlink()
    with pytest.raises(ValueError, match="has not finished"):
        record_run.record(run, cwd / "records", force=True)


COMMITTED = ROOT / "results" / "runs" / "resnet_table6" / "cifar_resnet20" / "seed0"


def test_committed_resnet20_record_still_scores_its_number(repro_eval, tmp_path):
    """The committed ResNet-20 record (issue 11: 64,000 steps of the paper's recipe) is complete and faithful, and
    repro-eval of its model.pt on the 10k CIFAR-10 test JPEGs at this commit gives its metrics.json figures exactly:
    a change to the model, the checkpoint format, the preprocessing or the evaluation that moves the number fails."""
    if not (CIFAR_ROOT / "test").is_dir():
        pytest.skip(f"CIFAR-10 test/ images not found in {CIFAR_ROOT}")
    from repro.report.figures import TABLES
    from repro.report.results import discover_runs, is_faithful

    metrics = json.loads((COMMITTED / "metrics.json").read_text())
    assert (metrics["steps"], metrics["split"], metrics["batch"]["global"]) == (64000, "test", 128)
    assert len(json.loads((COMMITTED / "run.json").read_text())["git_commit"]) == 40
    (run,) = discover_runs([str(COMMITTED)])
    table = TABLES["resnet_table6"]
    assert is_faithful(run, table, next(r for r in table.rows if r.label == "ResNet-20"))  # the paper's experiment
    res = repro_eval(f"weights.path={COMMITTED / 'model.pt'}", f"data.root={CIFAR_ROOT}", "data.num_workers=0",
                     "eval.progress=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (out,) = (tmp_path / "outputs" / "eval").glob("*/metrics.json")
    got = json.loads(out.read_text())
    assert (got["config"]["data"]["split"], got["config"]["data"]["limit"]) == ("test", None)
    assert got["center"] == metrics["center"] and got["center"]["images"] == 10000
