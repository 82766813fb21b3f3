"""Print the README's model-zoo table (params and mult-adds of every model at its paper resolution).

    python scripts/zoo_table.py > /tmp/zoo.md   # then paste between the README's zoo markers
"""

from __future__ import annotations

from repro.models import create_model, default_resolution, list_models, model_kwargs
from repro.report.complexity import summarize
from repro.report.reference import COMPLEXITY


def paper_figures() -> dict[str, str]:
    """The papers' figures for each zoo model at its defaults (its first row in repro.report.reference.COMPLEXITY)."""
    figures: dict[str, str] = {}
    for row in COMPLEXITY:
        if row.kwargs or row.resolution != default_resolution(row.model) or row.model in figures:
            continue
        madds = row.madds_m and (f"{row.madds_m / 1e3:g}G" if row.madds_m >= 1e3 else f"{row.madds_m:g}M")
        figures[row.model] = ", ".join([*([f"{madds} mult-adds"] if madds else []),
                                        *([f"{row.params_m:g}M params"] if row.params_m else [])])
    return figures


def zoo_table() -> str:
    """The zoo as a Markdown table."""
    rows = ["| model | input | options (kwargs) | params | mult-adds | paper |", "|---|---|---|---:|---:|---|"]
    paper = paper_figures()
    for name in list_models():
        r = default_resolution(name)
        s = summarize(create_model(name), r)
        opts = ", ".join(k for k in model_kwargs(name) if k != "num_classes")
        rows.append(f"| `{name}` | {r} | {opts} | {s['params'] / 1e6:.2f}M | {s['macs'] / 1e6:,.1f}M "
                    f"| {paper.get(name, '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(zoo_table())
