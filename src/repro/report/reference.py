"""The papers' published complexity figures, as data, each with its source.

Sources: He et al. 2015 (arXiv 1512.03385) Tables 1 and 6; Howard et al. 2017 (arXiv 1704.04861)
Tables 2-9; Sandler et al. 2018 (arXiv 1801.04381) Table 4; TF-slim's released-checkpoint tables
(tensorflow/models, research/slim/nets/mobilenet_v1.md and mobilenet/README.md). Collected in
`shared/PAPERS.md`. Mult-adds (MACs) in millions, parameters in millions, as printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ComplexityRow:
    """One published row: which model it is (zoo name, kwargs, input size) and the printed figures."""

    table: str
    label: str
    model: str
    resolution: int
    madds_m: float | None = None  # million mult-adds, as printed
    params_m: float | None = None  # million parameters, as printed
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""


RESNET = "He et al. 2015"
MOBILENET = "Howard et al. 2017"
MOBILENETV2 = "Sandler et al. 2018"
SLIM = "TF-slim released checkpoints"

# Each printed figure once; the tables that print it again (MobileNet's 1.0-224 appears in Tables 4, 6, 7 and 8)
# take it from here.
# ResNet Table 1: million mult-adds ("FLOPs", which the paper counts as multiply-adds) at 224, stride in the 1x1;
# the plain nets have the same figure as the ResNet of their depth.
RESNET_MADDS = {"resnet18": 1.8e3, "resnet34": 3.6e3, "resnet50": 3.8e3, "resnet101": 7.6e3, "resnet152": 11.3e3}
# ResNet Table 6 (CIFAR-10, option A): depth -> (test error %, million params); akamaster's error beside it.
RESNET_CIFAR = {20: (8.75, 0.27), 32: (7.51, 0.46), 44: (7.17, 0.66), 56: (6.97, 0.85), 110: (6.43, 1.7),
                1202: (7.93, 19.4)}
AKAMASTER_ERR = {20: 8.27, 32: 7.37, 44: 6.90, 56: 6.61, 110: 6.32, 1202: 6.18}
# MobileNet Tables 4-9 (ImageNet): (top-1 accuracy %, million mult-adds, million params) of the width x resolution
# models, by (alpha, resolution), and of the Conv (Table 4) and Shallow (Table 5) variants, by their option.
MOBILENET_PRINTED = {(1.0, 224): (70.6, 569, 4.2), (0.75, 224): (68.4, 325, 2.6), (0.5, 224): (63.7, 149, 1.3),
                     (0.25, 224): (50.6, 41, 0.5), (1.0, 192): (69.1, 418, 4.2), (1.0, 160): (67.2, 290, 4.2),
                     (1.0, 128): (64.4, 186, 4.2), (0.5, 160): (60.2, 76, 1.32)}
MOBILENET_VARIANTS = {"full_conv": (71.7, 4866, 29.3), "shallow": (65.3, 307, 2.9)}
# MobileNetV2 Table 4 at 224, by width: (top-1 accuracy %, million mult-adds, million params, Pixel 1 latency ms).
MOBILENETV2_PRINTED = {1.0: (72.0, 300, 3.4, 75), 1.4: (74.7, 585, 6.9, 143)}


def _v1_complexity(table: str, label: str, alpha: float = 1.0, res: int = 224) -> ComplexityRow:
    """A MobileNet width x resolution row of `table`, with its printed mult-adds and params."""
    _, madds, params = MOBILENET_PRINTED[(alpha, res)]
    return ComplexityRow(table, label, "mobilenet_v1", res, madds, params, {"width_mult": alpha} if alpha != 1 else {})


def _variant_complexity(table: str, label: str, option: str) -> ComplexityRow:
    """The Conv or Shallow MobileNet row of `table`."""
    _, madds, params = MOBILENET_VARIANTS[option]
    return ComplexityRow(table, label, "mobilenet_v1", 224, madds, params, {option: True})


COMPLEXITY: list[ComplexityRow] = [
    *(ComplexityRow("resnet_table1", f"{n}-layer", f"resnet{n}", 224, madds_m=RESNET_MADDS[f"resnet{n}"])
      for n in (18, 34, 50, 101, 152)),
    *(ComplexityRow("resnet_table6", f"ResNet-{n}", f"resnet{n}", 32, params_m=params)
      for n, (_, params) in RESNET_CIFAR.items()),
    # MobileNet Tables 4-9 (ImageNet).
    _variant_complexity("mobilenet_table4", "Conv MobileNet", "full_conv"),
    _v1_complexity("mobilenet_table4", "MobileNet"),
    _v1_complexity("mobilenet_table5", "0.75 MobileNet", 0.75),
    _variant_complexity("mobilenet_table5", "Shallow MobileNet", "shallow"),
    *(_v1_complexity("mobilenet_table6", f"{alpha} MobileNet-224", alpha) for alpha in (1.0, 0.75, 0.5, 0.25)),
    *(_v1_complexity("mobilenet_table7", f"1.0 MobileNet-{res}", 1.0, res) for res in (224, 192, 160, 128)),
    # Table 8 compares 1.0 MobileNet-224 with popular models, Table 9 the 0.50 MobileNet-160 with small ones.
    _v1_complexity("mobilenet_table8", "1.0 MobileNet-224"),
    _v1_complexity("mobilenet_table9", "0.50 MobileNet-160", 0.5, 160),
    # MobileNetV2 Table 4.
    ComplexityRow("mobilenetv2_table4", "MobileNetV2", "mobilenet_v2", 224, *MOBILENETV2_PRINTED[1.0][1:3]),
    ComplexityRow("mobilenetv2_table4", "MobileNetV2 (1.4)", "mobilenet_v2", 224, *MOBILENETV2_PRINTED[1.4][1:3],
                  {"width_mult": 1.4},
                  note="the paper's 585M / 6.9M disagree with TF-slim's own release of the same model "
                       "(582M / 6.06M), which our count matches"),
]

# MobileNet Table 2: share of mult-adds and of parameters (weights only) by layer type, 1.0 MobileNet-224.
MOBILENET_TABLE2 = {
    # type: (% mult-adds, % parameters) as printed
    "conv1x1": (94.86, 74.59),
    "conv3x3_dw": (3.06, 1.06),
    "conv3x3": (1.19, 0.02),  # misprint: 1.91% of mult-adds by every count (digits swapped)
    "fc": (0.18, 24.33),
}
MOBILENET_TABLE2_MISPRINTS = {("conv3x3", "madds"): 1.91}

# MobileNet Table 3: one 14x14x512 layer (stride 1): million mult-adds, million parameters.
MOBILENET_TABLE3 = {
    "Conv 3x3": (462, 2.36),
    "Depthwise Separable Conv": (52.3, 0.27),
    "alpha = 0.75": (29.6, 0.15),
    "rho = 0.714": (15.1, 0.15),  # applied on top of alpha = 0.75: 384 channels at 10x10
}

# TF-slim's released MobileNetV1 (million MACs) by width (rows) and resolution 224/192/160/128 (columns).
# Its 0.75 row is ~2.5% below the paper's Table 6 (325M) and ours, and its 0.25-192 (34) is out of line
# with its neighbours (~30 by scaling 41 x (192/224)^2); the paper's figures are the reference.
SLIM_V1_MACS = {
    1.0: (569, 418, 291, 186), 0.75: (317, 233, 162, 104), 0.5: (150, 110, 77, 49), 0.25: (41, 34, 21, 14),
}
SLIM_V1_PARAMS = {1.0: 4.24, 0.75: 2.59, 0.5: 1.34, 0.25: 0.47}

# TF-slim's released MobileNetV2 (million MACs) by width and resolution 224/192/160/128/96, and params
# (which count conv and fc weights only).
SLIM_V2_MACS = {
    1.0: (300, 221, 154, 99, 56), 0.75: (209, 153, 107, 69, 39),
    0.5: (97, 71, 50, 32, 18), 0.35: (59, 43, 30, 20, 11),
}
SLIM_V2_PARAMS = {1.4: 6.06, 1.3: 5.34, 1.0: 3.47, 0.75: 2.61, 0.5: 1.95, 0.35: 1.66}
SLIM_V2_MACS_224 = {1.4: 582, 1.3: 509}


# ------------------------------------------------------------------------------------------------ result tables
# The papers' result tables as data: which zoo model each printed row is, under which test protocol and on which
# split it was measured, and the figures as printed (error or accuracy in %, mult-adds and parameters in
# millions). `repro-tables` puts our runs beside them. Sources as above; the published reproductions
# (fb.resnet.torch, akamaster/pytorch_resnet_cifar10, TF-slim) are second references where a table has one.

FB_RESNET = "fb.resnet.torch (10-crop; option B, stride on the 3x3)"
AKAMASTER = "akamaster/pytorch_resnet_cifar10 (200 epochs)"


@dataclass(frozen=True)
class PaperRow:
    """One printed row: the zoo model and options it names, the printed figures, and how to run it."""

    label: str  # as printed
    model: str  # zoo name
    kwargs: dict[str, Any] = field(default_factory=dict)  # options beside the model config's defaults
    resolution: int | None = None  # input side; None = the model config's default
    paper: dict[str, float] = field(default_factory=dict)  # metric -> printed figure
    ref: dict[str, float] = field(default_factory=dict)  # metric -> the table's second reference
    select: dict[str, Any] = field(default_factory=dict)  # overrides of the table's experiment picking this row
    note: str = ""


@dataclass(frozen=True)
class PaperTable:
    """One results table of a paper: where its numbers were measured and its rows."""

    id: str
    caption: str
    source: str
    dataset: str  # the `data` config the runs must use
    split: str  # the split the numbers are measured on
    protocol: str  # center | ten_crop | multi_scale (repro-eval / final_protocols)
    metrics: tuple[str, ...]  # accuracy metrics, as the paper prints them
    rows: tuple[PaperRow, ...]
    experiment: str  # configs/experiment/<name>.yaml trains its rows
    ref_name: str = ""  # what `ref` holds
    notes: tuple[str, ...] = ()


def _r(label: str, model: str, row: str, **paper: float) -> PaperRow:
    """A ResNet-paper row selected by `row=<row>` in its experiment."""
    kwargs = {"shortcut": label[-1]} if label[-2:] in (" A", " B", " C") else {}
    return PaperRow(label, model, kwargs, paper=paper, select={"row": row})


def _r10(label: str, model: str, row: str, ref: tuple[float, float] | None = None, **paper: float) -> PaperRow:
    """A row of ResNet Table 3 (10-crop top-1 / top-5 error, RESNET_10CROP), with fb.resnet.torch's `ref`."""
    top1, top5 = RESNET_10CROP[row]
    kwargs = {"shortcut": label[-1]} if label[-2:] in (" A", " B", " C") else {}
    return PaperRow(label, model, kwargs, paper={"top1_err": top1, "top5_err": top5, **paper},
                    ref=dict(zip(("top1_err", "top5_err"), ref)) if ref else {}, select={"row": row})


def _v1(alpha: float, res: int, acc: float | None, **extra: Any) -> PaperRow:
    """A MobileNetV1 width x resolution row."""
    paper = {k: v for k, v in (("top1_acc", acc), ("madds_m", extra.pop("madds_m", None)),
                                ("params_m", extra.pop("params_m", None))) if v is not None}
    return PaperRow(f"{alpha:g} MobileNet-{res}", "mobilenet_v1", {"width_mult": alpha}, res, paper, **extra)


def _paper(acc: float, madds: float, params: float, latency: float | None = None) -> dict[str, float]:
    """A MobileNet row's printed figures as `PaperRow.paper`: top-1 accuracy, mult-adds, params (and latency)."""
    return {"top1_acc": acc, "madds_m": madds, "params_m": params, **({"latency_ms": latency} if latency else {})}


# ResNet Tables 2 and 3 (10-crop): row -> (top-1, top-5 error %); Table 2 prints the top-1 of plain-34 and ResNet-34 A
# again, and two rows of its own (top-1 only).
RESNET_10CROP = {"plain34": (28.54, 10.02), "resnet34_A": (25.03, 7.76), "resnet34_B": (24.52, 7.46),
                 "resnet34_C": (24.19, 7.40), "resnet50": (22.85, 6.71), "resnet101": (21.75, 6.05),
                 "resnet152": (21.43, 5.71)}
RESNET_TABLE2_ONLY = {"plain18": 27.94, "resnet18_A": 27.88}
_SLIM_RES = (224, 192, 160, 128)
_SLIM_V1_ACC = {  # TF-slim MobileNetV1 top-1 / top-5 accuracy by width, resolution 224/192/160/128
    1.0: ((70.9, 89.9), (70.0, 89.2), (68.0, 87.7), (65.2, 85.8)),
    0.75: ((68.4, 88.2), (67.2, 87.3), (65.3, 86.0), (62.1, 83.9)),
    0.5: ((63.3, 84.9), (61.7, 83.6), (59.1, 81.9), (56.3, 79.4)),
    0.25: ((49.8, 74.2), (47.7, 72.3), (45.5, 70.3), (41.5, 66.3)),
}
_V2_RES = (224, 192, 160, 128, 96)
_SLIM_V2_ACC = {  # TF-slim MobileNetV2 top-1 / top-5 accuracy by width, resolution 224/192/160/128/96
    1.0: ((71.8, 91.0), (70.7, 90.1), (68.8, 89.0), (65.3, 86.9), (60.3, 83.2)),
    0.75: ((69.8, 89.6), (68.7, 88.9), (66.4, 87.3), (63.2, 85.3), (58.8, 81.6)),
    0.5: ((65.4, 86.4), (63.9, 85.4), (61.0, 83.2), (57.7, 80.8), (51.2, 75.8)),
    0.35: ((60.3, 82.9), (58.2, 81.2), (55.7, 79.1), (50.8, 75.0), (45.5, 70.4)),
}
# The paper's own V1 figures for the grid's models (Tables 6 and 7): (alpha, resolution) -> (top-1 %, MMAdds, Mparams).
_V1_PAPER = {(alpha, res): v for (alpha, res), v in MOBILENET_PRINTED.items() if alpha == 1.0 or res == 224}


def _v1_paper(alpha: float, res: int, **extra: Any) -> PaperRow:
    """A row of MobileNet Tables 6/7 with the paper's figures."""
    acc, madds, params = _V1_PAPER[(alpha, res)]
    return _v1(alpha, res, acc, madds_m=madds, params_m=params, **extra)


def _grid_v1() -> tuple[PaperRow, ...]:
    """The 16 alpha x rho MobileNets of Figs. 4-5, the paper's figures where Tables 6-7 print them."""
    rows = []
    for alpha, accs in _SLIM_V1_ACC.items():
        for i, res in enumerate(_SLIM_RES):
            acc, madds, params = _V1_PAPER.get((alpha, res), (None, None, None))
            rows.append(_v1(alpha, res, acc, madds_m=madds, params_m=params,
                            ref={"top1_acc": accs[i][0], "top5_acc": accs[i][1], "madds_m": SLIM_V1_MACS[alpha][i],
                                 "params_m": SLIM_V1_PARAMS[alpha]},
                            select={"model.width_mult": alpha, "model.resolution": res}))
    return tuple(rows)


def _grid_v2() -> tuple[PaperRow, ...]:
    """MobileNetV2 multipliers x resolutions (TF-slim's release), the paper's figures for 1.0-224 and 1.4-224."""
    rows = []
    for alpha, accs in _SLIM_V2_ACC.items():
        for i, res in enumerate(_V2_RES):
            paper = _paper(*MOBILENETV2_PRINTED[1.0][:3]) if (alpha, res) == (1.0, 224) else {}
            rows.append(PaperRow(f"MobileNetV2 {alpha:g}-{res}", "mobilenet_v2", {"width_mult": alpha}, res, paper,
                                 ref={"top1_acc": accs[i][0], "top5_acc": accs[i][1],
                                      "madds_m": SLIM_V2_MACS[alpha][i], "params_m": SLIM_V2_PARAMS[alpha]},
                                 select={"model.width_mult": alpha, "model.resolution": res}))
    for alpha, acc, paper in ((1.4, (75.0, 92.5), _paper(*MOBILENETV2_PRINTED[1.4][:3])),
                              (1.3, (74.4, 92.1), {})):
        rows.append(PaperRow(f"MobileNetV2 {alpha:g}-224", "mobilenet_v2", {"width_mult": alpha}, 224, paper,
                             ref={"top1_acc": acc[0], "top5_acc": acc[1], "madds_m": SLIM_V2_MACS_224[alpha],
                                  "params_m": SLIM_V2_PARAMS[alpha]},
                             select={"model.width_mult": alpha, "model.resolution": 224}))
    return tuple(rows)


RESULT_TABLES: tuple[PaperTable, ...] = (
    PaperTable(
        "resnet_table2", "Top-1 error (%, 10-crop testing) on ImageNet validation: plain nets against ResNets "
        "(option A); the ResNets have no extra parameters.", f"{RESNET}, Table 2 (mult-adds: Table 1, §3.3)",
        "imagenet", "val", "ten_crop", ("top1_err",),
        (PaperRow("plain-18", "plain18", paper={"top1_err": RESNET_TABLE2_ONLY["plain18"]}, select={"row": "plain18"}),
         PaperRow("plain-34", "plain34", paper={"top1_err": RESNET_10CROP["plain34"][0],
                                                "madds_m": RESNET_MADDS["resnet34"]}, select={"row": "plain34"}),
         PaperRow("ResNet-18", "resnet18", {"shortcut": "A"}, paper={"top1_err": RESNET_TABLE2_ONLY["resnet18_A"],
                                                                     "madds_m": RESNET_MADDS["resnet18"]},
                  select={"row": "resnet18_A"}),
         PaperRow("ResNet-34", "resnet34", {"shortcut": "A"}, paper={"top1_err": RESNET_10CROP["resnet34_A"][0],
                                                                     "madds_m": RESNET_MADDS["resnet34"]},
                  select={"row": "resnet34_A"})),
        "resnet_table2"),
    PaperTable(
        "resnet_table3", "Error rates (%, 10-crop testing) on ImageNet validation.",
        f"{RESNET}, Table 3 (mult-adds: Table 1)", "imagenet", "val", "ten_crop", ("top1_err", "top5_err"),
        (_r10("plain-34", "plain34", "plain34", madds_m=RESNET_MADDS["resnet34"]),
         _r10("ResNet-34 A", "resnet34", "resnet34_A", madds_m=RESNET_MADDS["resnet34"]),
         _r10("ResNet-34 B", "resnet34", "resnet34_B", (24.76, 7.35), madds_m=RESNET_MADDS["resnet34"]),
         _r10("ResNet-34 C", "resnet34", "resnet34_C"),  # Table 1's 3.6G is B's
         _r10("ResNet-50", "resnet50", "resnet50", (22.24, 6.08), madds_m=RESNET_MADDS["resnet50"]),
         _r10("ResNet-101", "resnet101", "resnet101", (21.08, 5.35), madds_m=RESNET_MADDS["resnet101"]),
         _r10("ResNet-152", "resnet152", "resnet152", (20.69, 5.21), madds_m=RESNET_MADDS["resnet152"])),
        "resnet_table3", ref_name=FB_RESNET,
        notes=("The paper also lists VGG-16 28.07/9.33, GoogLeNet –/9.15 and PReLU-net 24.27/7.38 (not in the zoo).",)),
    PaperTable(
        "resnet_table4", "Error rates (%) of single-model results on ImageNet validation (fully-convolutional, "
        "scores averaged over shorter sides {224, 256, 384, 480, 640}).", f"{RESNET}, Table 4 (mult-adds: Table 1)",
        "imagenet", "val", "multi_scale", ("top1_err", "top5_err"),
        (_r("ResNet-34 B", "resnet34", "resnet34_B", top1_err=21.84, top5_err=5.71, madds_m=RESNET_MADDS["resnet34"]),
         _r("ResNet-34 C", "resnet34", "resnet34_C", top1_err=21.53, top5_err=5.60),
         _r("ResNet-50", "resnet50", "resnet50", top1_err=20.74, top5_err=5.25, madds_m=RESNET_MADDS["resnet50"]),
         _r("ResNet-101", "resnet101", "resnet101", top1_err=19.87, top5_err=4.60, madds_m=RESNET_MADDS["resnet101"]),
         _r("ResNet-152", "resnet152", "resnet152", top1_err=19.38, top5_err=4.49, madds_m=RESNET_MADDS["resnet152"])),
        "resnet_table4"),
    PaperTable(
        "resnet_table6", "Classification error (%) on the CIFAR-10 test set (option A shortcuts; "
        "64k iterations, a schedule chosen on a 45k/5k train/val split).", f"{RESNET}, Table 6", "cifar10", "test",
        "center", ("top1_err",),
        tuple(PaperRow(f"ResNet-{n}", f"resnet{n}", paper={"top1_err": err, "params_m": params},
                       ref={"top1_err": AKAMASTER_ERR[n]}, select={"row": f"cifar_resnet{n}"},
                       note="best of 5 runs; mean 6.61 ± 0.16" if n == 110 else "")
              for n, (err, params) in RESNET_CIFAR.items()),
        "resnet_table6", ref_name=AKAMASTER,
        notes=("The paper also lists Maxout 9.38, NIN 8.81, DSN 8.22, FitNet 8.39 and Highway 7.54 "
               "(not in the zoo).",)),
    PaperTable(
        "mobilenet_table4", "Depthwise separable vs full convolution MobileNet (ImageNet top-1 accuracy, %).",
        f"{MOBILENET}, Table 4", "imagenet", "val", "center", ("top1_acc",),
        (PaperRow("Conv MobileNet", "mobilenet_v1", {"full_conv": True}, 224, _paper(*MOBILENET_VARIANTS["full_conv"]),
                  select={"row": "conv_mobilenet"}),
         PaperRow("MobileNet", "mobilenet_v1", {}, 224, _paper(*MOBILENET_PRINTED[(1.0, 224)]),
                  select={"row": "mobilenet_1.0_224"})),
        "mobilenet_table4"),
    PaperTable(
        "mobilenet_table5", "Narrow vs shallow MobileNet (ImageNet top-1 accuracy, %).", f"{MOBILENET}, Table 5",
        "imagenet", "val", "center", ("top1_acc",),
        (PaperRow("0.75 MobileNet", "mobilenet_v1", {"width_mult": 0.75}, 224, _paper(*MOBILENET_PRINTED[(0.75, 224)]),
                  select={"row": "mobilenet_0.75_224"}),
         PaperRow("Shallow MobileNet", "mobilenet_v1", {"shallow": True}, 224, _paper(*MOBILENET_VARIANTS["shallow"]),
                  select={"row": "shallow_mobilenet"})),
        "mobilenet_table5"),
    PaperTable(
        "mobilenet_table6", "MobileNet width multiplier (ImageNet top-1 accuracy, %).", f"{MOBILENET}, Table 6",
        "imagenet", "val", "center", ("top1_acc",),
        tuple(_v1_paper(a, 224, select={"model.width_mult": a}) for a in (1.0, 0.75, 0.5, 0.25)),
        "mobilenet_table6"),
    PaperTable(
        "mobilenet_table7", "MobileNet resolution (ImageNet top-1 accuracy, %).", f"{MOBILENET}, Table 7",
        "imagenet", "val", "center", ("top1_acc",),
        tuple(_v1_paper(1.0, r, select={"model.resolution": r}) for r in _SLIM_RES),
        "mobilenet_table7"),
    PaperTable(
        "mobilenet_table8", "MobileNet comparison to popular models (ImageNet top-1 accuracy, %).",
        f"{MOBILENET}, Table 8", "imagenet", "val", "center", ("top1_acc",),
        (_v1_paper(1.0, 224, select={"row": "mobilenet_1.0_224"}),), "mobilenet_table8",
        notes=("The paper also lists GoogleNet 69.8% / 1550M / 6.8M and VGG 16 71.5% / 15300M / 138M "
               "(not in the zoo).",)),
    PaperTable(
        "mobilenet_table9", "Smaller MobileNet comparison to popular models (ImageNet top-1 accuracy, %).",
        f"{MOBILENET}, Table 9", "imagenet", "val", "center", ("top1_acc",),
        (PaperRow("0.50 MobileNet-160", "mobilenet_v1", {"width_mult": 0.5}, 160,
                  _paper(*MOBILENET_PRINTED[(0.5, 160)]), select={"row": "mobilenet_0.5_160"}),),
        "mobilenet_table9",
        notes=("The paper also lists Squeezenet 57.5% / 1700M / 1.25M and AlexNet 57.2% / 720M / 60M "
               "(not in the zoo).",)),
    PaperTable(
        "mobilenet_grid", "The 16 MobileNets of width alpha x resolution rho (Figs. 4 and 5; ImageNet top-1 "
        "accuracy, %); the paper prints figures for 7 of them (Tables 6 and 7).",
        f"{MOBILENET}, Figs. 4-5 and Tables 6-7; second reference: {SLIM}", "imagenet", "val", "center",
        ("top1_acc", "top5_acc"), _grid_v1(), "mobilenet_grid", ref_name=SLIM,
        notes=("TF-slim's 0.75 row counts ~2.5% fewer mult-adds than the paper's Table 6 and ours, and its 0.25-192 "
               "(34M) is out of line with its neighbours; TF-slim classifies 1001 classes (background first).",)),
    PaperTable(
        "mobilenetv2_table4", "Performance on ImageNet (top-1 accuracy, %) for different networks.",
        f"{MOBILENETV2}, Table 4", "imagenet", "val", "center", ("top1_acc",),
        (PaperRow("MobileNetV1", "mobilenet_v1", {}, 224,  # V1's accuracy and params; its own mult-adds and latency
                  _paper(MOBILENET_PRINTED[(1.0, 224)][0], 575, MOBILENET_PRINTED[(1.0, 224)][2], 113),
                  select={"experiment": "mobilenet_table8", "row": "mobilenet_1.0_224"},
                  note="this table prints 575M mult-adds for the model MobileNet's own Table 8 gives 569M"),
         PaperRow("MobileNetV2", "mobilenet_v2", {}, 224, _paper(*MOBILENETV2_PRINTED[1.0]),
                  select={"row": "mobilenetv2_1.0_224"}),
         PaperRow("MobileNetV2 (1.4)", "mobilenet_v2", {"width_mult": 1.4}, 224, _paper(*MOBILENETV2_PRINTED[1.4]),
                  select={"row": "mobilenetv2_1.4_224"},
                  note="TF-slim's release of this model counts 582M / 6.06M, as we do")),
        "mobilenetv2_table4",
        notes=("The paper also lists ShuffleNet (1.5) 71.5% / 292M / 3.4M, ShuffleNet (x2) 73.7% / 524M / 5.4M and "
               "NasNet-A 74.0% / 564M / 5.3M / 183 ms (not in the zoo).",
               "Latency: the paper's is TF-Lite on one large core of a Google Pixel 1 (batch 1); ours is ONNX Runtime, "
               "1 thread, batch 1, on the CPU named below (repro-bench). Milliseconds on an x86 core and a Pixel 1 "
               "are not comparable; the ratios to MobileNetV1 (÷ V1) are.")),
    PaperTable(
        "mobilenetv2_grid", "MobileNetV2 width multipliers x resolutions (ImageNet top-1 / top-5 accuracy, %).",
        f"{MOBILENETV2}, Table 4 and §6.1; second reference: {SLIM}", "imagenet", "val", "center",
        ("top1_acc", "top5_acc"), _grid_v2(), "mobilenetv2_grid", ref_name=SLIM,
        notes=("TF-slim counts parameters as conv and fc weights, as we do for MobileNets.",)),
)
