"""How far CodeUnlearn's knobs move a real-world request: ``python -m bench.generic_frontier --profile default``.

``bench.generic_request`` measures one request at the profile's settings. This command asks whether any
setting of the request's selection (``bench.generic_request.frontier`` in params.yaml: S', alpha, the
positions counted, strength, the gate) meets issue 20's two request bars at once: forget ROUGE <= 0.3x
before and held-out neighbour ROUGE >= 0.9x before. Each point runs CodeUnlearn in this process on the
profile's codebook model, reloaded per point, with the neighbour file's control part as control and gate
calibration, exactly as `codeunlearn forget --retain-file` does; it is scored by greedy ROUGE-L recall on
the forget file and on the neighbour file's held-out part. Model utility is left to
``bench.generic_request`` (one default request costs ~25 min of scoring; this grid, ~1 min a point).

Writes ``bench/results/<profile>/generic_frontier.json`` whole, stamped with commit, machine and load, and
``docs/img/generic_frontier_<profile>.png``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.generic_request import BARS, ratios
from bench.run import stamp
from codeunlearn.io import read_json, write_json
from codeunlearn.methods import get_method
from codeunlearn.metrics.scoring import split_rouges
from codeunlearn.report.plots import request_frontier_plot
from tasks.common import forget_records, load_role, method_params, neighbour_sets, read_forget_file
from tasks.context import REPO_ROOT, RunContext, make_context, torch_threads

METHOD = "codeunlearn"
SCORED = ("forget_rouge", "neighbour_rouge")  # what each point is scored by, in ``rouges``' order


def with_override(params: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """The method's params with one frontier point's values (``gate`` merged key by key)."""
    merged = {**params, **{k: v for k, v in override.items() if k != "gate"}}
    if "gate" in override:
        merged["gate"] = {**params["gate"], **override["gate"]}
    return merged


def measure(ctx: RunContext) -> dict[str, Any]:
    files = ctx.settings["bench"]["generic_request"]
    forget = forget_records(ctx, files["forget_file"])
    scored = read_forget_file(ctx, files["forget_file"]).records
    neighbours = neighbour_sets(ctx, files["retain_file"])
    if neighbours is None:
        raise SystemExit("bench.generic_request.retain_file: the frontier needs a neighbour file")
    control, held_out = neighbours
    generation = ctx.eval_spec().generation
    method = get_method(METHOD)

    def rouges(checkpoint: Any) -> tuple[float, float]:
        forget_rouge, neighbour_rouge = split_rouges(
            checkpoint.model, checkpoint.tokenizer, [scored, held_out], generation, ctx.progress
        )
        return forget_rouge, neighbour_rouge

    before = rouges(load_role(ctx, method.base_role))
    base = {**method_params(ctx, METHOD, {}), "statistics_dir": None}  # the control is the neighbour file's
    points = []
    for override in files["frontier"]:
        checkpoint = load_role(ctx, method.base_role)
        result = method.unlearn(checkpoint.model, checkpoint.tokenizer, forget, control, with_override(base, override))
        after = dict(zip(SCORED, rouges(checkpoint), strict=True))
        checked = ratios(dict(zip(SCORED, before, strict=True)), after, {key: BARS[key] for key in SCORED})
        points.append(
            {
                "override": override,
                "forget_rouge_after": after["forget_rouge"],
                "neighbour_rouge_after": after["neighbour_rouge"],
                "ratios": {key: item["ratio"] for key, item in checked.items()},
                "both_bars_met": all(item["met"] for item in checked.values()),
                "codes_disabled": result.stats["disabled_codes"],
            }
        )
        print(json.dumps(points[-1]), flush=True)
    return stamp(
        ctx,
        {
            "what": "CodeUnlearn's selection settings on the generic request: forget and held-out neighbour ROUGE",
            "files": {k: files[k] for k in ("forget_file", "retain_file")},
            "base_settings": {k: v for k, v in base.items() if k not in ("provenance", "statistics_dir")},
            "forget_rouge_before": before[0],
            "neighbour_rouge_before": before[1],
            "bars": {key: f"{'<=' if d == 'le' else '>='} {bar}x before" for key, (d, bar) in BARS.items()},
            "bar_values": {key: BARS[key][1] for key in SCORED},
            "points": points,
            "any_point_meets_both": any(p["both_bars_met"] for p in points),
            "control_records": len(control),
            "held_out_records": len(held_out),
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: evaluate.threads)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the saved JSON")
    args = parser.parse_args(argv)
    ctx = make_context(args.profile)
    result_file = REPO_ROOT / "bench" / "results" / ctx.profile / "generic_frontier.json"
    plot_file = REPO_ROOT / "docs" / "img" / f"generic_frontier_{ctx.profile}.png"
    if args.replot:
        request_frontier_plot(read_json(result_file), plot_file)
        return
    # One thread where another job holds the other core: two contended threads decode ~20x slower.
    with torch_threads(args.threads or ctx.settings["evaluate"]["threads"]):
        payload = measure(ctx)
    write_json(result_file, payload)
    request_frontier_plot(payload, plot_file)
    shown = ("forget_rouge_before", "neighbour_rouge_before", "any_point_meets_both")
    print(json.dumps({key: payload[key] for key in shown}))


if __name__ == "__main__":
    main()
