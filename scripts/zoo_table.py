"""Print the README's model-zoo table (params and mult-adds of every model at its paper resolution).

    python scripts/zoo_table.py > /tmp/zoo.md   # then paste between the README's zoo markers
"""

from __future__ import annotations

from repro.complexity import summarize
from repro.models import create_model, default_resolution, list_models, model_kwargs

PAPER = {  # the papers' printed figures, for the reader's comparison
    "resnet18": "1.8G mult-adds", "resnet34": "3.6G mult-adds", "resnet50": "3.8G mult-adds",
    "resnet101": "7.6G mult-adds", "resnet152": "11.3G mult-adds",
    "resnet20": "0.27M params", "resnet32": "0.46M params", "resnet44": "0.66M params",
    "resnet56": "0.85M params", "resnet110": "1.7M params", "resnet1202": "19.4M params",
    "mobilenet_v1": "569M mult-adds, 4.2M params", "mobilenet_v2": "300M mult-adds, 3.4M params",
}


def zoo_table() -> str:
    """The zoo as a Markdown table."""
    rows = ["| model | input | options (kwargs) | params | mult-adds | paper |", "|---|---|---|---:|---:|---|"]
    for name in list_models():
        r = default_resolution(name)
        s = summarize(create_model(name), r)
        opts = ", ".join(k for k in model_kwargs(name) if k != "num_classes")
        rows.append(f"| `{name}` | {r} | {opts} | {s['params'] / 1e6:.2f}M | {s['macs'] / 1e6:,.1f}M "
                    f"| {PAPER.get(name, '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(zoo_table())
