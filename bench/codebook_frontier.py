"""Forget ROUGE against model utility for both codebook modes, from ``bench.codebook_grid``'s JSON:

    python -m bench.codebook_frontier --profile default --out docs/codebook_frontier.png

Every grid point of each mode (CodeUnlearn filled, its random-code control hollow), the unmasked
codebook model as a star; the pipeline's target and oracle (``eval/metrics.json``) as reference lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from codeunlearn.io import read_json  # noqa: E402
from tasks.context import make_context  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLOURS = {"residual": "tab:blue", "bottleneck": "tab:orange"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.codebook_frontier", description=__doc__)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, colour in COLOURS.items():
        path = RESULTS / args.profile / f"codebook_grid_{mode}.json"
        if not path.exists():
            continue
        rows = [row for row in read_json(path)["rows"] if row.get("model_utility") is not None]
        if not rows:
            continue  # a ROUGE-only grid has no model utility to plot
        for row in rows:
            if row.get("model_utility") is None:
                continue
            point = (row["forget_rouge"], row["model_utility"])
            if row["name"] == "unmasked":
                ax.scatter(*point, marker="*", s=160, color=colour, label=f"{mode}: no mask")
            elif row["name"] == "random_codes":
                ax.scatter(*point, s=40, facecolors="none", edgecolors=colour)
            else:
                ax.scatter(*point, s=30, color=colour)
                gate = "gated" if row.get("gate_quantile") is not None else "ungated"
                ax.annotate(
                    f"{row['size']}, c={row['strength']:g}, {gate}",
                    point,
                    fontsize=6,
                    xytext=(3, 2) if gate == "gated" else (3, -8),
                    textcoords="offset points",
                )
        ax.scatter([], [], s=30, color=colour, label=f"{mode}: CodeUnlearn (S', c, gate)")
        ax.scatter([], [], s=40, facecolors="none", edgecolors=colour, label=f"{mode}: random codes, same gate")
    ctx = make_context(args.profile)
    metrics_file = ctx.stage_dir("eval") / "metrics.json"
    if metrics_file.exists():
        metrics = read_json(metrics_file)
        mode = read_json(ctx.stage_dir("models") / "codebook" / "training.json").get("mode", "bottleneck")
        mask = read_json(ctx.stage_dir("mask") / "mask.json")
        colour = COLOURS[mode]
        unmasked = (metrics["codebook"]["forget_rouge"], metrics["codebook"]["model_utility"])
        ax.scatter(*unmasked, marker="*", s=160, color=colour, label=f"{mode}: no mask (the pipeline's)")
        deployed = (metrics["codeunlearn"]["forget_rouge"], metrics["codeunlearn"]["model_utility"])
        ax.scatter(*deployed, s=90, marker="D", color=colour, label=f"{mode}: the pipeline's mask (full evaluation)")
        ax.annotate(
            f"{mask['count']}, c={mask.get('strength', 1.0):g}, gated",
            deployed,
            fontsize=6,
            xytext=(3, -8),
            textcoords="offset points",
        )
        control = (metrics["random_codes"]["forget_rouge"], metrics["random_codes"]["model_utility"])
        ax.scatter(*control, s=90, marker="D", facecolors="none", edgecolors=colour)
        ax.axhline(
            metrics["target"]["model_utility"],
            color="0.3",
            linestyle="--",
            linewidth=0.8,
            label="target's model utility",
        )
        ax.axvline(
            metrics["oracle"]["forget_rouge"],
            color="tab:green",
            linestyle=":",
            linewidth=0.8,
            label="oracle's forget ROUGE",
        )
    ax.set_xlabel("forget ROUGE-L recall (lower is better)")
    ax.set_ylabel("TOFU model utility (higher is better)")
    ax.set_title(f"CodeUnlearn's two codebook modes ({args.profile} profile)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(args.out)


if __name__ == "__main__":
    main()
