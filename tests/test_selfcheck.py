"""repro-selfcheck: the JSON report on a CPU (CUDA checks skipped), its schema, and exit code 1 on a FAIL."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from repro import selfcheck
from repro.selfcheck import Check, expected_collectives, loss_verdict

# What the report holds on a machine without a GPU: every check by name, and the status it must have.
CPU_STATUSES = {
    "environment": "pass", "gpu": "skip", "precision_flags": "pass", "collectives_gloo": "pass",
    "collectives_nccl": "skip", "train_fp32": "pass", "train_bf16": "skip", "train_fp16": "skip",
    "train_bf16_compile": "skip", "eval_parity": "pass", "throughput": "pass", "device_batches": "skip",
    "device_decode": "skip", "memory_train": "skip", "memory_ten_crop": "skip", "resume": "pass",
}
SMALL = ["throughput_steps=2", "resume_steps=4"]  # the training check at its defaults: 30 steps, batch 32


def cpu_env() -> dict[str, str]:
    """No GPU visible and no surrounding torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return {**env, "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
def test_selfcheck_json_on_cpu(tmp_path):
    """`repro-selfcheck format=json` on a CPU: schema, the CUDA checks SKIP with the reason, the others PASS, exit 0."""
    res = subprocess.run(["repro-selfcheck", "format=json", *SMALL], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=cpu_env())
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    report = json.loads(res.stdout)  # stdout is the report alone; logs went to stderr
    assert set(report) >= {"machine", "checks"}
    m = report["machine"]
    assert m["cuda_available"] is False and m["gpus"] == [] and m["torch"]
    assert {"cuda", "cudnn", "nccl", "flags"} <= set(m)
    for c in report["checks"]:
        assert set(c) == {"name", "status", "detail"} and isinstance(c["detail"], str) and c["detail"]
    got = {c["name"]: c["status"] for c in report["checks"]}
    assert got == CPU_STATUSES, report["checks"]
    for c in report["checks"]:
        if c["status"] == "skip":
            assert "no CUDA GPU visible" in c["detail"]
    details = {c["name"]: c["detail"] for c in report["checks"]}
    assert "all_reduce_sum" in details["collectives_gloo"] and "broadcast_object" in details["collectives_gloo"]
    assert "bit-identical" in details["resume"] and "stopped at step 2, resumed at 2" in details["resume"]
    # The same report is kept in the run dir outputs/selfcheck/<date_time>/.
    (run,) = (tmp_path / "outputs" / "selfcheck").iterdir()
    assert json.loads((run / "selfcheck.json").read_text())["checks"] == report["checks"]
    assert (run / "config.yaml").is_file()


def test_a_failing_check_exits_1_and_is_reported(in_process, tmp_path, monkeypatch):
    """A FAIL in any check: exit code 1, the check FAIL in the JSON and in selfcheck.json; an exception is a FAIL."""
    def broken(ctx):
        return [Check("broken_check", "fail", "deliberately broken")]

    def raises(ctx):
        raise RuntimeError("a collective hung")

    monkeypatch.setitem(selfcheck.CHECKS, "memory", broken)
    monkeypatch.setitem(selfcheck.CHECKS, "throughput", raises)
    res = in_process(selfcheck.main, "repro-selfcheck", "format=json", "device=cpu",
                     "checks=[environment,memory,throughput]", cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    report = json.loads(res.stdout)
    got = {c["name"]: (c["status"], c["detail"]) for c in report["checks"]}
    assert got["environment"][0] == "pass"
    assert got["broken_check"] == ("fail", "deliberately broken")
    assert got["throughput"][0] == "fail" and "RuntimeError: a collective hung" in got["throughput"][1]
    (run,) = (tmp_path / "outputs" / "selfcheck").iterdir()
    assert json.loads((run / "selfcheck.json").read_text())["checks"] == report["checks"]


def test_all_pass_exits_0_with_a_table(in_process, tmp_path):
    """The table format: one line per check with its status, a count line, exit 0 when nothing fails."""
    res = in_process(selfcheck.main, "repro-selfcheck", "device=cpu", "checks=[environment]", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert any(line.split()[:2] == ["environment", "PASS"] for line in lines if line.strip())
    assert lines[-1] == "2 passed, 0 failed, 1 skipped"  # gpu skipped on device=cpu


@pytest.mark.parametrize("arg, message", [("format=yaml", "format='yaml' is not valid"),
                                          ("checks=[nope]", "checks=['nope'] are not known")])
def test_bad_arguments(in_process, tmp_path, arg, message):
    """Unknown format or check group: exit 2 with a one-line message."""
    res = in_process(selfcheck.main, "repro-selfcheck", arg, cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr


def test_loss_verdict():
    """Falling loss passes; flat or rising fails; a NaN fails and names its step."""
    assert loss_verdict([2.3, 2.2, 2.0, 1.8, 1.5, 1.2])[0]
    assert not loss_verdict([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])[0]
    assert not loss_verdict([1.0] * 6)[0]
    ok, detail = loss_verdict([2.3, 2.0, math.nan, 1.0])
    assert not ok and "step 2" in detail
    assert not loss_verdict([])[0]


def test_collective_expectations_by_hand():
    """Two ranks: counts [1,10]+[2,20], halves 0.5+1.0, rank 0's object, both ranks' objects, mean gradient 1.5."""
    want = expected_collectives(2)
    assert want["all_reduce_sum_long"] == [3, 30]
    assert want["all_reduce_sum_float"] == [1.5, 1.5, 1.5]
    assert want["broadcast_object"] == {"run_dir": "dir-of-rank-0"}
    assert want["gather_objects"] == [[["rank", 0]], [["rank", 1]]]
    assert want["ddp_grad"] == [1.5] * 4  # d/dw sum(w . x) = x: ranks feed 1s and 2s, DDP averages


def test_console_script_registered():
    """pyproject.toml registers repro-selfcheck."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'repro-selfcheck = "repro.selfcheck:main"' in text
    assert subprocess.run(["repro-selfcheck", "--help"], capture_output=True, timeout=120).returncode == 0


class CpuAsGpu(selfcheck.Context):
    """A context whose CUDA-only checks run, on the CPU."""

    @property
    def cuda(self) -> bool:
        """Claim a GPU."""
        return True


def test_gpu_data_checks_run_on_the_cpu_as_if_a_gpu(tmp_path, monkeypatch):
    """device_batches and device_decode, whose real run needs a GPU, executed on the CPU in its place (CUDA's sync
    debug mode faked): in-memory batches stay on the device; the device decoder matches the CPU decoder exactly."""
    import torch
    from hydra import compose, initialize_config_dir

    from repro.cli import CONFIG_DIR
    from repro.config import register_configs

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        ctx = CpuAsGpu(compose("selfcheck"), torch.device("cpu"), tmp_path)
        batches = selfcheck.check_device_batches(ctx)
        decode = selfcheck.check_device_decode(ctx)
    assert (batches.status, modes) == ("pass", ["error", 0]), batches.detail
    assert batches.detail.startswith("5 batches")
    assert decode.status == "pass" and "pixels 0.00 apart on average (max 0)" in decode.detail, decode.detail
