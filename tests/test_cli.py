"""The command-line apps: configs compose and are checked, repro-summary prints and saves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from common import ROOT
from repro.cli import CONFIG_DIR
from repro.config import register_configs
from repro.models import create_model, create_model_from_config, default_resolution, list_models, model_kwargs


def compose_summary(*overrides: str):
    """Compose the repro-summary config as the command line would."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("summary", overrides=list(overrides))


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a console script the way a user does."""
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300)


def test_one_model_config_per_architecture():
    """configs/model/ has one file per zoo name, whose keys are name, resolution and the model's kwargs."""
    files = {p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")}
    assert files == set(list_models())
    for name in list_models():
        cfg = compose_summary(f"model={name}").model
        assert cfg.name == name
        assert set(cfg) == {"name", "resolution", *model_kwargs(name)}


# Command-line values other than every model's defaults, for each option a model config may hold.
OVERRIDES = {"shortcut": "C", "stride_in_1x1": False, "num_classes": 7, "zero_init_residual": True,
             "shortcut_pad": "split", "width_mult": 0.5, "full_conv": True, "shallow": True, "activation": "relu",
             "dropout": 0.3}


def _same_model(built: torch.nn.Module, expected: torch.nn.Module, size: int) -> None:
    """Same layers (repr: activations, dropout rates), shapes, seeded weights and outputs."""
    assert repr(built) == repr(expected)
    a, b = built.state_dict(), expected.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 20
    with torch.no_grad():
        assert torch.equal(built.eval()(x), expected.eval()(x))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", [n for n in list_models() if n != "resnet1202"])
def test_model_configs_build_their_model(name):
    """Each model config builds create_model(name) (same layers, shapes, seeded weights and outputs) at the zoo's
    resolution: its YAML file, read here with PyYAML, states no option, the constructor's defaults being their one
    home; and with every option overridden on the command line (to values that are no model's default),
    create_model with those values."""
    raw = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    assert raw["name"] == name and set(raw) == {"defaults", "name", "resolution"}
    cfg = OmegaConf.to_container(compose_summary(f"model={name}").model)
    assert cfg["resolution"] == raw["resolution"] == default_resolution(name)  # 224 ImageNet, 32 CIFAR
    size = 64 if cfg["resolution"] == 224 else 32
    torch.manual_seed(0)
    built = create_model_from_config(cfg)
    torch.manual_seed(0)
    _same_model(built, create_model(name), size)
    changed = {k: OVERRIDES[k] for k in model_kwargs(name)}
    args = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changed.items()]
    cfg = OmegaConf.to_container(compose_summary(f"model={name}", *args).model)
    torch.manual_seed(0)
    built = create_model_from_config(cfg)
    torch.manual_seed(0)
    _same_model(built, create_model(name, **changed), size)


def test_typo_in_override_fails_when_config_is_built():
    """A misspelt key is refused by the structured config before anything runs."""
    with pytest.raises(ConfigCompositionException, match="widht_mult"):
        compose_summary("model=mobilenet_v1", "model.widht_mult=0.5")


def test_wrong_type_in_override_fails_when_config_is_built():
    """A value of the wrong type is refused by the structured config."""
    with pytest.raises(ConfigCompositionException, match="width_mult"):
        compose_summary("model=mobilenet_v1", "model.width_mult=wide")


def compose_app(config: str, *overrides: str):
    """Compose a command's config (train, eval, ...) as its command line would."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config, overrides=list(overrides))


# (command config, override, the valid choices as the README states them)
BAD_CHOICES = [
    ("train", "trainer.amp=bf61", ["auto", "bf16", "fp16", "off"]),
    ("train", "trainer.device=tpu", ["auto", "cpu", "cuda"]),
    ("train", "recipe.augment.train=pad", ["pad_crop", "scale_aug", "inception", "mobilenet", "none"]),
    ("train", "data.on_error=ignore", ["raise", "skip"]),
    ("train", "data.decode=nvjpeg", ["cpu", "gpu"]),
    ("train", "resume=maybe", ["never", "auto"]),
    ("train", "model.shortcut=D", ["A", "B", "C"]),
    ("eval", "eval.average=mean", ["softmax", "logits"]),
    ("eval", "eval.precision=fp8", ["fp32", "tf32", "bf16", "fp16"]),
    ("eval", "weights.format=caffe", ["repro", "torchvision", "akamaster"]),
    ("summary", "format=xml", ["table", "json"]),
]


@pytest.mark.parametrize(("config", "override", "valid"), BAD_CHOICES)
def test_bad_choice_is_refused_when_config_is_built(config, override, valid):
    """The schema itself refuses a value outside an option's choices while composing (no command's checks run),
    listing the valid ones; each valid one composes, and reads back as that plain string."""
    key, value = override.split("=")
    with pytest.raises(ConfigCompositionException) as info:
        compose_app(config, override)
    assert value in str(info.value.__cause__) and str(valid).replace("'", "") in str(info.value.__cause__)
    for choice in valid:
        got = OmegaConf.select(compose_app(config, f"{key}={choice}"), key)
        assert got == choice and f"{got}" == choice and json.dumps(got) == f'"{choice}"'


@pytest.mark.parametrize(("prog", "args", "line"), [
    ("repro-train", ["trainer.amp=bf61"],
     "trainer.amp='bf61' is not valid; choose one of ['auto', 'bf16', 'fp16', 'off']"),
    ("repro-eval", ["weights.path=x.pt", "eval.protocols=[center,tencrop]"],
     "eval.protocols[1]='tencrop' is not valid; choose one of ['center', 'ten_crop', 'multi_scale', 'slim_center']"),
    ("repro-summary", ["model=resnet56", "model.shortcut_pad=both"],
     "model.shortcut_pad='both' is not valid; choose one of ['after', 'split']"),
    # null for a typed choice, and a group option with no config file: one line too, naming the valid ones
    ("repro-train", ["trainer.amp=null"],
     "trainer.amp=null is not valid; choose one of ['auto', 'bf16', 'fp16', 'off']"),
    ("repro-train", ["seed=null"], "seed=null is not valid; give it a value"),
    ("repro-train", ["data=cifar11"], "data=cifar11: configs/data/ has no cifar11.yaml; choose one of ['checkpoint', "
     "'cifar10', 'cifar100', 'digits', 'folder', 'imagenet', 'synthetic']"),
    ("repro-summary", ["model=resnet21"], "model=resnet21: configs/model/ has no resnet21.yaml; choose one of "
     "['mobilenet_v1', 'mobilenet_v2', 'plain110', 'plain18', 'plain20', 'plain32', 'plain34', 'plain44', 'plain56', "
     "'resnet101', 'resnet110', 'resnet1202', 'resnet152', 'resnet18', 'resnet20', 'resnet32', 'resnet34', 'resnet44', "
     "'resnet50', 'resnet56']"),
])
def test_bad_choice_is_one_line_through_the_cli(in_process, tmp_path, prog, args, line):
    """Through the console script a bad choice is one line naming key, value and choices; exit 2, nothing written."""
    from repro import eval, summary, train

    main = {"repro-train": train.main, "repro-eval": eval.main, "repro-summary": summary.main}[prog]
    res = in_process(main, prog, *args, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [f"error: {line}"]
    assert not list(tmp_path.iterdir())


def test_summary_json(tmp_path):
    """`repro-summary ... format=json` prints one JSON object with the issue's fields, and keeps it in the run dir."""
    res = run("repro-summary", "model=mobilenet_v1", "model.width_mult=0.5", "model.resolution=160",
              "format=json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert round(out["macs"] / 1e6) == 77  # MobileNet Table 8: 0.50 MobileNet-160, 76M (TF-slim: 77M)
    assert out["params"] == 1_331_592
    assert set(out["by_type"]) == {"conv1x1", "conv3x3", "conv3x3_dw", "fc"}
    assert all(set(v) >= {"params", "macs"} for v in out["by_type"].values())
    assert sum(v["macs"] for v in out["by_type"].values()) == out["macs"]
    assert len(out["layers"]) == 28  # 27 convs + fc (Table 1 of the MobileNet paper)
    runs = list((tmp_path / "outputs" / "summary").iterdir())
    assert len(runs) == 1
    saved = runs[0]
    assert json.loads((saved / "summary.json").read_text())["macs"] == out["macs"]
    resolved = yaml.safe_load((saved / "config.yaml").read_text())
    assert resolved["model"]["width_mult"] == 0.5 and resolved["format"] == "json"
    info = json.loads((saved / "run.json").read_text())
    assert "git_commit" in info
    assert not list(tmp_path.glob("*.json"))  # nothing written outside the run dir


def test_summary_table(tmp_path):
    """The table shows per-layer rows, totals and the by-type breakdown of MobileNet Table 2."""
    res = run("repro-summary", "model=resnet18", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "conv1" in text and "7x7/2" in text and "64x112x112" in text
    assert "1,814,073,344 mult-adds" in text and "11,689,512 params" in text
    assert "by layer type" in text and "conv3x3" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=resnet34", "model.shortcut=D"], "shortcut='D' is not valid; choose one of ['A', 'B', 'C']"),
        (["model=mobilenet_v1", "model.width_mult=0"], "width_mult=0.0 is not valid"),
        (["model=resnet18", "format=xml"], "format='xml' is not valid; choose one of ['table', 'json']"),
        (["model=resnet18", "model.resolution=0"], "model.resolution=0 is not valid"),
        (["model=resnet19"], "model=resnet19: configs/model/ has no resnet19.yaml; choose one of"),
    ],
)
def test_summary_bad_input_clear_message(tmp_path, args, message):
    """Bad values stop repro-summary with a message naming the problem, no traceback."""
    res = run("repro-summary", *args, cwd=tmp_path)
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_module_entry_point(tmp_path):
    """`python -m repro.summary` works like the console script."""
    res = run(sys.executable, "-m", "repro.summary", "model=resnet20", "format=json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["params"] == 269_722


def test_readme_zoo_table_is_current():
    """The README's zoo table is exactly what scripts/zoo_table.py computes from the models."""
    import runpy

    zoo_table = runpy.run_path(str(ROOT / "scripts" / "zoo_table.py"))["zoo_table"]
    readme = (ROOT / "README.md").read_text()
    assert zoo_table() in readme, "README zoo table is stale: run `python scripts/zoo_table.py` and paste it"


def test_ci_runs_the_readme_test_command():
    """.ci/run calls the README's second quickstart command, verbatim."""
    readme = (ROOT / "README.md").read_text()
    commands = [block.split("```")[0].strip() for block in readme.split("```bash\n")[1:3]]
    assert commands[0].startswith("pip install -e . && repro-")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
