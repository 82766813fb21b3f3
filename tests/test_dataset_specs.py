"""What a dataset is lives in its spec (repro.data.datasets.SPECS); no code outside data/ tests a dataset's name."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from repro.data.build import crop_problem
from repro.data.datasets import DATA_KEYS, SPECS, DataError, spec_of
from repro.eval import eval_views
from repro.report.responses import _eval_views

SRC = Path(__file__).resolve().parents[1] / "src" / "repro"
RECORDS = SRC / "report" / "reference.py"  # the published tables: each names the dataset it was measured on, as data


def _outside_data() -> list[Path]:
    """The package's Python files outside data/."""
    return sorted(p for p in SRC.rglob("*.py") if (SRC / "data") not in p.parents)


def _names_a_dataset(node: ast.AST) -> bool:
    """A string constant that is a dataset's name, or a tuple/list/set of them."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_dataset(e) for e in node.elts)
    return isinstance(node, ast.Constant) and node.value in SPECS


def name_tests(path: Path) -> list[str]:
    """Where `path` tests a dataset's name: the issue's grep (names from SPECS; reference.py's records aside),
    and, in every file, comparisons with a name and startswith/endswith of a name's prefix."""
    text = path.read_text()
    found = []
    if path != RECORDS:
        names = "|".join(map(re.escape, SPECS))
        pattern = re.compile(rf'"({names})"|startswith\("cifar')
        found += [f"{path.name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                  if pattern.search(line)]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Compare) and any(_names_a_dataset(n) for n in [node.left, *node.comparators]):
            found.append(f"{path.name}:{node.lineno}: compares with a dataset name")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith") and node.args):
            args = node.args[0].elts if isinstance(node.args[0], ast.Tuple) else [node.args[0]]
            if any(isinstance(a, ast.Constant) and isinstance(a.value, str) and len(a.value) > 2
                   and any(name.startswith(a.value) for name in SPECS) for a in args):
                found.append(f"{path.name}:{node.lineno}: {node.func.attr} of a dataset name")
    return sorted(set(found))


def test_no_dataset_name_is_tested_outside_data():
    """Callers ask the dataset's spec (in_memory, folders, eval_size, ...) instead of testing its name."""
    files = _outside_data()
    assert RECORDS in files and SRC / "train.py" in files and SRC / "data" / "build.py" not in files
    found = [hit for path in files for hit in name_tests(path)]
    assert found == [], "dataset names tested outside data/ (ask repro.data.datasets.spec_of(name) instead):\n" + \
        "\n".join(found)


def test_the_name_check_finds_each_kind_of_test(tmp_path):
    """The check above is not blind: it finds a quoted name, a comparison, a tuple of names and a prefix test."""
    probe = tmp_path / "probe.py"
    probe.write_text('def f(cfg):\n    if cfg.name in ("digits", "x"):\n        return 1\n'
                     '    if cfg.name == "imagenet":\n        return 2\n    return cfg.name.startswith("cifar")\n')
    hits = name_tests(probe)
    assert [h.split(":")[1] for h in hits if "compares" in h] == ["2", "4"]
    assert any("startswith of a dataset name" in h for h in hits)
    assert len([h for h in hits if '"' in h]) == 3  # the grep: lines 2, 4 and 6


@pytest.mark.parametrize(("name", "resolution", "expected"), [
    ("digits", 32, (None, None)),  # the image itself, as repro-train evaluates it (not 37 -> 32)
    ("cifar10", 32, (None, None)),
    ("cifar100", 32, (None, None)),
    ("imagenet", 224, (256, 224)),  # 224 / 0.875 = 256
    ("folder", 160, (183, 160)),  # 160 / 0.875 = 182.9
    ("synthetic", 224, (256, 224)),
])
def test_eval_and_analysis_take_the_specs_evaluation_views(name, resolution, expected):
    """repro-eval's auto views and Fig. 7's views are the spec's: the image as it is for in-memory data."""
    assert spec_of(name).eval_size(resolution) == expected
    cfg = OmegaConf.create({"eval": {"protocols": ["center"], "resize": "auto", "crop": "auto", "scales": [],
                                     "flip": False, "interpolation": "bilinear", "antialias": True,
                                     "central_fraction": 0.875}})
    views = eval_views(cfg, {"resolution": resolution}, {"name": name})
    assert (views.resize, views.crop) == expected
    fig7 = _eval_views({"resolution": resolution}, {"name": name})
    assert (fig7.resize, fig7.crop) == expected


def test_spec_answers():
    """The questions callers ask, answered per dataset (by hand from the datasets' definitions)."""
    table = {name: (s.in_memory, s.folders, s.identity, s.jpeg_copies, s.augments) for name, s in SPECS.items()}
    files, memory = ("pad_crop", "scale_aug", "inception", "mobilenet"), ("pad_crop", "none")
    assert table == {"imagenet": (False, True, True, False, files), "folder": (False, True, True, False, files),
                     "cifar10": (True, False, True, True, memory), "cifar100": (True, False, True, True, memory),
                     "synthetic": (False, False, False, False, files), "digits": (True, False, True, False, memory)}
    assert DATA_KEYS == {"train_dir": ("folder", "imagenet"), "val_dir": ("folder", "imagenet")}
    assert spec_of("cifar100").title == "CIFAR-100"
    with pytest.raises(DataError, match=r"data='mnist' is not valid; choose one of \['imagenet', 'folder'"):
        spec_of("mnist")


def _crop_cfg(data: dict, model: str, resolution: int, train: str = "pad_crop", crop: object = "auto") -> object:
    """The keys crop_problem reads."""
    aug = SimpleNamespace(train=train, crop=crop, pad=4)
    return SimpleNamespace(data=SimpleNamespace(**data), model=SimpleNamespace(name=model, resolution=resolution),
                           recipe=SimpleNamespace(augment=aug))


@pytest.mark.parametrize(("data", "resolution", "train", "size"), [
    ({"name": "cifar10"}, 224, "pad_crop", 32),  # CIFAR's own 32: 224 > 32 + 8
    ({"name": "digits", "image_size": 24}, 40, "none", 24),  # data.image_size, no padding: 40 > 24
    ({"name": "synthetic", "image_size": 16}, 32, "pad_crop", 16),  # 32 > 16 + 8
])
def test_crop_problem_sizes_come_from_the_spec(data, resolution, train, size):
    """Fixed-size data refuses a crop larger than its image (+ padding); files of any size never do."""
    problem = crop_problem(_crop_cfg(data, "m", resolution, train))
    assert problem is not None and f"images are {size}x{size}" in problem
    assert crop_problem(_crop_cfg(data, "m", size, train)) is None  # the image's own size fits
    assert crop_problem(_crop_cfg({"name": "imagenet"}, "m", 4096, train)) is None
    assert crop_problem(_crop_cfg({"name": "synthetic", "image_size": 16}, "m", 224, "inception")) is None
