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

COMPLEXITY: list[ComplexityRow] = [
    # ResNet Table 1 ("FLOPs", which the paper counts as multiply-adds), ImageNet at 224, stride in the 1x1.
    ComplexityRow("resnet_table1", "18-layer", "resnet18", 224, madds_m=1.8e3),
    ComplexityRow("resnet_table1", "34-layer", "resnet34", 224, madds_m=3.6e3),
    ComplexityRow("resnet_table1", "50-layer", "resnet50", 224, madds_m=3.8e3),
    ComplexityRow("resnet_table1", "101-layer", "resnet101", 224, madds_m=7.6e3),
    ComplexityRow("resnet_table1", "152-layer", "resnet152", 224, madds_m=11.3e3),
    # ResNet Table 6 (CIFAR-10), option A.
    ComplexityRow("resnet_table6", "ResNet-20", "resnet20", 32, params_m=0.27),
    ComplexityRow("resnet_table6", "ResNet-32", "resnet32", 32, params_m=0.46),
    ComplexityRow("resnet_table6", "ResNet-44", "resnet44", 32, params_m=0.66),
    ComplexityRow("resnet_table6", "ResNet-56", "resnet56", 32, params_m=0.85),
    ComplexityRow("resnet_table6", "ResNet-110", "resnet110", 32, params_m=1.7),
    ComplexityRow("resnet_table6", "ResNet-1202", "resnet1202", 32, params_m=19.4),
    # MobileNet Tables 4-9 (ImageNet).
    ComplexityRow("mobilenet_table4", "Conv MobileNet", "mobilenet_v1", 224, 4866, 29.3, {"full_conv": True}),
    ComplexityRow("mobilenet_table4", "MobileNet", "mobilenet_v1", 224, 569, 4.2),
    ComplexityRow("mobilenet_table5", "0.75 MobileNet", "mobilenet_v1", 224, 325, 2.6, {"width_mult": 0.75}),
    ComplexityRow("mobilenet_table5", "Shallow MobileNet", "mobilenet_v1", 224, 307, 2.9, {"shallow": True}),
    ComplexityRow("mobilenet_table6", "1.0 MobileNet-224", "mobilenet_v1", 224, 569, 4.2),
    ComplexityRow("mobilenet_table6", "0.75 MobileNet-224", "mobilenet_v1", 224, 325, 2.6, {"width_mult": 0.75}),
    ComplexityRow("mobilenet_table6", "0.5 MobileNet-224", "mobilenet_v1", 224, 149, 1.3, {"width_mult": 0.5}),
    ComplexityRow("mobilenet_table6", "0.25 MobileNet-224", "mobilenet_v1", 224, 41, 0.5, {"width_mult": 0.25}),
    ComplexityRow("mobilenet_table7", "1.0 MobileNet-224", "mobilenet_v1", 224, 569, 4.2),
    ComplexityRow("mobilenet_table7", "1.0 MobileNet-192", "mobilenet_v1", 192, 418, 4.2),
    ComplexityRow("mobilenet_table7", "1.0 MobileNet-160", "mobilenet_v1", 160, 290, 4.2),
    ComplexityRow("mobilenet_table7", "1.0 MobileNet-128", "mobilenet_v1", 128, 186, 4.2),
    # Table 8 compares 1.0 MobileNet-224 with popular models, Table 9 the 0.50 MobileNet-160 with small ones.
    ComplexityRow("mobilenet_table8", "1.0 MobileNet-224", "mobilenet_v1", 224, 569, 4.2),
    ComplexityRow("mobilenet_table9", "0.50 MobileNet-160", "mobilenet_v1", 160, 76, 1.32, {"width_mult": 0.5}),
    # MobileNetV2 Table 4.
    ComplexityRow("mobilenetv2_table4", "MobileNetV2", "mobilenet_v2", 224, 300, 3.4),
    ComplexityRow("mobilenetv2_table4", "MobileNetV2 (1.4)", "mobilenet_v2", 224, 585, 6.9, {"width_mult": 1.4},
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
