"""Every plot of the run's reports, drawn from the JSON the stages write (no model, no text).

The main job's evaluation (``PLOTS``: file name -> title in the report), the comparison's leaderboard,
the S' frontier and the sequential studies. Each takes its numbers and a path and writes a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# The evaluation's plots, as the report shows them: file (in the eval folder) -> title.
PLOTS = {
    "rouge.png": "ROUGE-L, forget vs retain",
    "quantization.png": "Quantization attack: forget ROUGE and recovery per precision",
    "codes.png": "Code usage on forget vs retain, disabled codes highlighted",
}
SEQUENTIAL_PLOT = "sequential.png"
FRONTIER_PLOT = "frontier.png"


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rouge_plot(metrics: dict[str, dict[str, Any]], path: Path) -> None:
    names = list(metrics)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, [metrics[n]["forget_rouge"] for n in names], 0.4, label="forget (lower is better)")
    ax.bar(x + 0.2, [metrics[n]["retain_rouge"] for n in names], 0.4, label="retain (higher is better)")
    ax.set_xticks(x, names)
    ax.set_ylabel("ROUGE-L recall")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    save_figure(fig, path)


def quantization_plot(metrics: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: forget ROUGE at full precision and per quantizer; right: recovery (quantized - full)."""
    models = [m for m in metrics if metrics[m].get("quant")]
    specs = sorted(
        {name for m in models for name in metrics[m]["quant"]},
        key=lambda n: (-int(n.split("_w")[1].split("_")[0]), n),
    )
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    positions = np.arange(len(specs) + 1)
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        quant = metrics[model]["quant"]
        values = [metrics[model]["forget_rouge"], *[quant.get(s, {}).get("forget_rouge", np.nan) for s in specs]]
        left.plot(positions, values, marker="o", label=model)
        recoveries = [quant.get(s, {}).get("recovery", np.nan) for s in specs]
        right.bar(np.arange(len(specs)) + (i - (len(models) - 1) / 2) * width, recoveries, width, label=model)
    left.set_xticks(positions, ["full", *specs], rotation=20, fontsize=8)
    left.set_ylabel("forget ROUGE-L recall")
    left.set_ylim(0, 1.05)
    left.legend(fontsize=7)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(np.arange(len(specs)), specs, rotation=20, fontsize=8)
    right.set_ylabel("recovery (quantized - full)")
    save_figure(fig, path)


def codes_plot(usage: dict[str, Any], path: Path) -> None:
    """Per-code usage rate on retain (x) vs forget (y), log-log; disabled and random-control codes marked."""
    forget = np.asarray(usage["forget_rate"])
    retain = np.asarray(usage["retain_rate"])
    floor = 0.5 / max(usage["forget_slots"], usage["retain_slots"])
    fx, fy = np.maximum(retain, floor), np.maximum(forget, floor)
    live = (forget > 0) | (retain > 0)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(fx[live], fy[live], s=6, color="0.6", label=f"live codes ({int(live.sum())})")
    random_ids = usage["random_ids"]
    ax.scatter(
        fx[random_ids],
        fy[random_ids],
        s=26,
        facecolors="none",
        edgecolors="tab:blue",
        label=f"random control ({len(random_ids)})",
    )
    mask_ids = usage["mask_ids"]
    ax.scatter(fx[mask_ids], fy[mask_ids], s=18, color="tab:red", label=f"disabled by CodeUnlearn ({len(mask_ids)})")
    bounds = [floor * 0.8, max(fx.max(), fy.max()) * 1.25]
    ax.plot(bounds, bounds, color="black", linewidth=0.6, linestyle="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(bounds)
    ax.set_ylim(bounds)
    ax.set_xlabel("usage rate on retain split (share of code slots; unused at the edge)")
    ax.set_ylabel("usage rate on forget set (share of code slots)")
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)


def leaderboard_plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row["forget_rouge"] is None or row["retain_rouge"] is None:
            continue
        ax.scatter(row["forget_rouge"], row["retain_rouge"], s=50)
        ax.annotate(
            row["method"],
            (row["forget_rouge"], row["retain_rouge"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
        q4 = row.get("forget_rouge_q4")
        if q4 is not None:
            ax.annotate(
                "",
                xy=(q4, row["retain_rouge"]),
                xytext=(row["forget_rouge"], row["retain_rouge"]),
                arrowprops={"arrowstyle": "->", "color": "tab:red", "alpha": 0.6},
            )
    ax.set_xlabel("forget ROUGE-L recall (lower is better); red arrow: after 4-bit RTN")
    ax.set_ylabel("retain ROUGE-L recall (higher is better)")
    ax.set_title("Methods on the same model and forget set")
    save_figure(fig, path)


def frontier_plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    series = sorted({(r["selection"], r["control"]) for r in rows if r["selection"] != "none"})
    for selection, control in series:
        points = sorted(
            (r for r in rows if (r["selection"], r["control"]) == (selection, control)), key=lambda r: r["size"]
        )
        label = f"{selection}, control: {control}" if selection != "random" else "random codes (ungated)"
        ax.plot([p["forget_rouge"] for p in points], [p["retain_rouge"] for p in points], "o-", label=label)
        for p in points:
            ax.annotate(str(p["size"]), (p["forget_rouge"], p["retain_rouge"]), fontsize=7)
    base = next(r for r in rows if r["selection"] == "none")
    ax.scatter([base["forget_rouge"]], [base["retain_rouge"]], marker="*", s=120, color="k", label="no mask")
    ax.set_xlabel("forget ROUGE-L recall (lower is better)")
    ax.set_ylabel("retain ROUGE-L recall (higher is better)")
    ax.set_title("Forget/utility frontier over S' (labels: codes disabled)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def tune_frontier_plot(summary: dict[str, Any], path: Path) -> None:
    """Forget ROUGE against model utility (left) and retain ROUGE (right), the rule's two floors: every
    grid point, one colour per method, each method's selected point ringed, target and oracle marked,
    the floors dashed (``tasks.tune``)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, metric, label in zip(
        axes, ("model_utility", "retain_rouge"), ("model utility", "retain ROUGE-L recall"), strict=True
    ):
        _tune_panel(ax, summary, metric)
        ax.set_xlabel(f"{label} (higher is better)")
    axes[0].set_ylabel("forget ROUGE-L recall (lower is better)")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("Tuning grid: every point; ringed: each method's selected point; dashed: the floor", fontsize=10)
    save_figure(fig, path)


def _tune_panel(ax: Any, summary: dict[str, Any], metric: str) -> None:
    colours = plt.get_cmap("tab10")
    for position, method in enumerate(summary["selection"]):
        own = [p for p in summary["points"] if p["method"] == method]
        colour = colours(position % 10)
        ax.scatter(
            [p["row"][metric] for p in own], [p["row"]["forget_rouge"] for p in own], s=22, color=colour, label=method
        )
        chosen = [p for p in own if p["index"] == summary["selection"][method].get("index")]
        ax.scatter(
            [p["row"][metric] for p in chosen],
            [p["row"]["forget_rouge"] for p in chosen],
            s=140,
            facecolors="none",
            edgecolors=colour,
        )
    for name, marker in (("target", "*"), ("oracle", "P")):
        row = summary[name]
        ax.scatter([row[metric]], [row["forget_rouge"]], marker=marker, s=150, color="k", zorder=3)
        ax.annotate(name, (row[metric], row["forget_rouge"]), fontsize=8, xytext=(5, 4), textcoords="offset points")
    ax.axvline(summary["floors"][metric], color="grey", linestyle="--", linewidth=1, label="floor")


def _plot_sustainability(ax: Any, result: dict[str, Any]) -> None:
    rows = result["rows"]
    x = [0, *[int(row["request"]) for row in rows]]
    baseline = result["baseline"]
    first = [baseline["forget_rouge_first"], *[row["forget_rouge_first"] for row in rows]]
    ax.plot(x, first, "o-", label="forget: first request's set")
    ax.plot(x[1:], [row["forget_rouge_requested"] for row in rows], "s-", label="forget: all requested so far")
    ax.plot(x[1:], [row["forget_rouge_current"] for row in rows], "^:", label="forget: the new request's set")
    ax.plot(x, [baseline["retain_rouge"], *[row["retain_rouge"] for row in rows]], "o-", label="retain")
    if rows and "random_retain_rouge" in rows[0]:
        ax.plot(
            x[1:],
            [row["random_forget_rouge_requested"] for row in rows],
            "s--",
            color="0.5",
            label="random codes: forget requested",
        )
        ax.plot(x[1:], [row["random_retain_rouge"] for row in rows], "o--", color="0.7", label="random codes: retain")
    ax.set_xticks(x)
    ax.set_xlabel("requests so far (0 = codebook model, no mask)")
    ax.set_ylabel("ROUGE-L recall")
    ax.set_ylim(0, 1.05)
    ax.set_title("Sustainability: sequential requests")
    ax.legend(fontsize=7)


def _plot_scalability(ax: Any, result: dict[str, Any]) -> None:
    rows = result["rows"]
    x = [int(row["authors"]) for row in rows]
    ax.plot(x, [row["forget_rouge_before"] for row in rows], "o:", color="0.3", label="forget, no mask")
    ax.plot(x, [row["forget_rouge"] for row in rows], "s-", label="forget, CodeUnlearn")
    ax.plot(x, [row["retain_rouge"] for row in rows], "o-", label="retain, CodeUnlearn")
    if rows and "random_forget_rouge" in rows[0]:
        ax.plot(x, [row["random_forget_rouge"] for row in rows], "s--", color="0.5", label="forget, random codes")
        ax.plot(x, [row["random_retain_rouge"] for row in rows], "o--", color="0.7", label="retain, random codes")
    ax.set_xticks(x)
    ax.set_xlabel("authors in the forget set")
    ax.set_ylabel("ROUGE-L recall")
    ax.set_ylim(0, 1.05)
    ax.set_title("Scalability: growing forget sets")
    ax.legend(fontsize=7)


def sequential_plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """One panel per experiment that ran (a note in place of a disabled or skipped one)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, draw) in zip(
        axes, (("sustainability", _plot_sustainability), ("scalability", _plot_scalability)), strict=True
    ):
        result = results.get(name) or {}
        if result.get("rows"):
            draw(ax, result)
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{name}: {result.get('skipped', 'not run')}", ha="center", va="center", wrap=True)
    save_figure(fig, path)


def request_frontier_plot(result: dict[str, Any], path: Path) -> None:
    """One request's selection settings: forget ROUGE after/before against held-out neighbour ROUGE
    after/before, each point numbered as in the benchmarks table (``#``), the two bars dashed
    (``bench.generic_frontier``)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for number, point in enumerate(result["points"], start=1):
        x, y = point["ratios"]["neighbour_rouge"], point["ratios"]["forget_rouge"]
        ax.scatter([x], [y], s=30, color="tab:green" if point["both_bars_met"] else "tab:blue")
        ax.annotate(str(number), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
    bars = result["bar_values"]
    ax.axhline(bars["forget_rouge"], color="grey", linestyle="--", linewidth=1)
    ax.axvline(bars["neighbour_rouge"], color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(f"held-out neighbour ROUGE, after / before (higher is better; bar >= {bars['neighbour_rouge']})")
    ax.set_ylabel(f"forget ROUGE, after / before (lower is better; bar <= {bars['forget_rouge']})")
    ax.set_title("Generic request: CodeUnlearn's selection settings (green: both bars met)", fontsize=10)
    save_figure(fig, path)
