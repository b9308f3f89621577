"""How the pruning benchmark names and draws its grid: the method configurations it runs, their labels, and
the accuracy-against-kept-fraction figure (`docs/figures/pruning_*.png`). Apart from the benchmark so that the
figure's tests import no benchmark."""

from __future__ import annotations

from typing import Any

import numpy as np

from models.pruning import list_methods

__all__ = ["method_configs", "curve_label", "family", "pruning_figure"]


def method_configs(methods: list[str]) -> list[tuple[str, bool, str]]:
    out = []
    for m in list_methods():
        if methods and m.name not in methods:
            continue
        if m.kind == "unstructured":
            out.append((m.name, False, "uniform"))
        else:
            out += [(m.name, False, "uniform"), (m.name, True, "uniform")]
            if m.name == "greedy-layer":
                out.append((m.name, True, "equal-error"))
    return out


def curve_label(r: dict[str, Any]) -> str:
    label = r["method"]
    if r["reweight"]:
        label += " +rw"
    if r["budget"] != "uniform":
        label += f" ({r['budget']})"
    return label


def family(label: str) -> str:
    """The method a curve belongs to, without its reweighting or budget suffix: one colour per family."""
    return label.split(" ")[0]


def pruning_figure(groups: dict, model: str, labels: list[str], keeps: list[float], dense_acc: float) -> Any:
    """Unstructured methods in one panel; structured without and with reweighting side by side. Each method
    family keeps one colour and one marker in every panel; the line style says the layer budget (solid uniform,
    dotted equal-error) and the legend sits outside the panels, so no curve runs through it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    kind_of = {}
    for lab in labels:
        rs_all = [groups[(model, lab, k)] for k in keeps if (model, lab, k) in groups]
        if rs_all:
            kind_of.setdefault(family(lab), rs_all[0][0]["kind"])
    colours, markers = {}, {}
    for kind in ("unstructured", "structured"):  # each kind its own palette: its panels never share a legend
        for i, fam in enumerate(f for f, k in kind_of.items() if k == kind):
            colours[fam] = plt.cm.tab10.colors[i % 10]
            markers[fam] = "osD^vP*Xph"[(i + i // 10) % 10]  # past ten colours, the marker still differs
    line_of = {"unstructured": "--", "structured": "-"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), sharey=True, layout="constrained")
    for lab in labels:
        rs_all = [groups[(model, lab, k)] for k in keeps if (model, lab, k) in groups]
        if not rs_all:
            continue
        kind = rs_all[0][0]["kind"]
        ax = axes[0] if kind == "unstructured" else axes[2] if "+rw" in lab else axes[1]
        ks = [rs[0]["keep"] for rs in rs_all]
        acc = [np.mean([r["accuracy"] for r in rs]) for rs in rs_all]
        err = [np.std([r["accuracy"] for r in rs]) for rs in rs_all]
        fam = family(lab)
        style = ":" if "(" in lab else line_of.get(kind, "-")
        ax.errorbar(
            ks, acc, yerr=err, marker=markers[fam], ms=5, color=colours[fam], linestyle=style, capsize=2, label=lab
        )
    titles = ["unstructured (kept fraction of weights)", "structured, no reweighting", "structured + reweighting"]
    for ax, title in zip(axes, titles, strict=True):
        ax.axhline(dense_acc, color="0.4", linewidth=1.0, linestyle="--")
        ax.set_xscale("log")
        # plain labels at the measured fractions ("0.25", not "2.5x10^-1")
        ax.xaxis.set_major_locator(FixedLocator(sorted(keeps)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.set_xlabel("kept fraction")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    seeds = sorted({r["seed"] for rs in groups.values() for r in rs if r.get("model", model) == model and "seed" in r})
    if len(seeds) == 1:
        over = f"seed {seeds[0]}"
    else:
        over = "mean ± std over seeds" + (" " + ", ".join(map(str, seeds)) if seeds else "")
    axes[0].set_ylabel(f"test accuracy right after pruning ({over})")

    def handle(fam: str) -> Line2D:
        style = line_of[kind_of[fam]]
        return Line2D([], [], color=colours[fam], marker=markers[fam], ms=5, linestyle=style, label=fam)

    extra = [Line2D([], [], color="0.4", linestyle="--", label=f"dense ({dense_acc:.3f})")]
    if any("(" in lab for lab in labels):
        extra.append(Line2D([], [], color="k", linestyle=":", label="equal-error layer budget"))
    places = (
        ("unstructured", "outside right upper", "left panel"),
        ("structured", "outside right lower", "middle and right panels"),
    )
    for kind, loc, where in places:
        fams = [f for f, k in kind_of.items() if k == kind]
        if fams:
            handles = [handle(f) for f in fams] + (extra if kind == "structured" else [])
            fig.legend(handles=handles, loc=loc, fontsize=7, title=f"{kind} ({where})", title_fontsize=8)
    fig.suptitle(f"{model}: no fine-tuning, 512 calibration samples")
    return fig
