"""Speed at equal forgetting: ``python -m bench.equal_forgetting --profile default``.

``latency.json`` times NPO at the profile's settings, which forget less than CodeUnlearn. Here NPO is
timed at the point of its tuning grid that forgets as much as CodeUnlearn's selected point: the cheapest
NPO point (fewest steps, then the lowest forget ROUGE) whose forget ROUGE is at or below CodeUnlearn's,
or NPO's lowest forget ROUGE when no point reaches it (``reaches: false``). Both are timed here, on one
machine, ``--repeats`` times each, medians: NPO's method call on the loaded target with that point's
params (``latency.json``'s scope) and CodeUnlearn's ``request_s`` in fresh ``codeunlearn forget``
processes with its selected point's params (``bench.run.request_process``).

Reads the grid from ``bench/results/<profile>/tune.json`` (``python -m bench.tune``); writes
``bench/results/<profile>/equal_forgetting.json`` whole, stamped with commit, machine and load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from bench.run import RESULTS, request_process, stamp, time_unlearning
from codeunlearn.config import deep_merge
from codeunlearn.data.records import read_jsonl_records
from codeunlearn.io import read_json, write_json
from codeunlearn.methods import get_method
from tasks.common import load_role
from tasks.context import PARAMS_FILE, RunContext, make_context
from tasks.tune import point_context

REFERENCE = "codeunlearn"
BASELINE = "npo"
SCORE = "forget_rouge"
# Shown beside forgetting wherever a point is named: a point that forgets by breaking the model is no win.
UTILITY = ("model_utility", "retain_rouge")


def selected_point(summary: Mapping[str, Any], method: str) -> dict[str, Any]:
    """``method``'s point chosen by the tuning rule."""
    chosen = summary["selection"].get(method, {})
    if "index" not in chosen:
        raise ValueError(f"tune.json: no selected point for {method!r} ({chosen.get('status', 'not tuned')})")
    return next(p for p in summary["points"] if p["method"] == method and p["index"] == chosen["index"])


def equal_forgetting_point(
    summary: Mapping[str, Any], steps_of: Callable[[Mapping[str, Any]], int], goal: float
) -> tuple[dict[str, Any], bool]:
    """The baseline's cheapest grid point with forget ROUGE <= ``goal`` (fewest ``steps_of(params)``, then
    the lowest forget ROUGE) and True; or its lowest forget ROUGE and False when none reaches ``goal``."""
    points = [p for p in summary["points"] if p["method"] == BASELINE]
    if not points:
        raise ValueError(f"tune.json: no {BASELINE!r} points; run `python -m bench.tune` with it")
    reaching = [p for p in points if p["row"][SCORE] <= goal]
    if reaching:
        return min(reaching, key=lambda p: (steps_of(p["params"]), p["row"][SCORE], p["index"])), True
    return min(points, key=lambda p: (p["row"][SCORE], steps_of(p["params"]), p["index"])), False


def described(point: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "index": point["index"],
        "params": point["params"],
        **{name: point["row"][name] for name in (SCORE, *UTILITY)},
    }


def with_point_params(ctx: RunContext, method: str, params: Mapping[str, Any], out: Path) -> Path:
    """A params file: the repository's, with ``params`` set in ``method``'s block of the profile."""
    settings = yaml.safe_load(PARAMS_FILE.read_text())
    profile = settings["profiles"].setdefault(ctx.profile, {}) or {}
    settings["profiles"][ctx.profile] = deep_merge(profile, get_method(method).params_override(params))
    out.write_text(yaml.safe_dump(settings, sort_keys=False))
    return out


def time_baseline(ctx: RunContext, params: Mapping[str, Any], repeats: int) -> list[float]:
    """The baseline's method call on the loaded target with the point's params, ``repeats`` times."""
    point = point_context(ctx, BASELINE, dict(params))
    forget = read_jsonl_records(ctx.stage_dir("splits") / "forget.jsonl")
    retain, _ = ctx.retain_split()
    target = load_role(ctx, get_method(BASELINE).base_role)
    params = point.method_params(BASELINE, {})
    return time_unlearning(target, BASELINE, forget, retain, params, repeats, "equal forgetting")[0]


def measure(ctx: RunContext, summary: Mapping[str, Any], repeats: int) -> dict[str, Any]:
    reference = selected_point(summary, REFERENCE)

    def steps_of(params: Mapping[str, Any]) -> int:
        return int(point_context(ctx, BASELINE, dict(params)).method_params(BASELINE, {})["steps"])

    baseline, reaches = equal_forgetting_point(summary, steps_of, reference["row"][SCORE])
    requests = []
    with tempfile.TemporaryDirectory(prefix="codeunlearn-equal-") as scratch:
        params_file = with_point_params(ctx, REFERENCE, reference["params"], Path(scratch) / "params.yaml")
        for _ in range(repeats):
            requests.append(request_process(ctx, ctx.stage_dir("splits") / "forget.jsonl", params_file))
            print(f"equal forgetting: {REFERENCE} request {requests[-1]}", flush=True)
    request_runs = [r["request_s"] for r in requests]
    request_s = statistics.median(request_runs)
    baseline_runs = time_baseline(ctx, baseline["params"], repeats)
    return {
        "what": f"{BASELINE}'s method call at the grid point forgetting as much as {REFERENCE}'s selected point, "
        f"against {REFERENCE}'s request_s there (fresh processes); medians of {repeats}",
        "tune_git_commit": summary["git_commit"],
        REFERENCE: {
            **described(reference),
            "request_runs_s": request_runs,
            "request_s": statistics.median(request_runs),
        },
        BASELINE: {
            **described(baseline),
            "steps": steps_of(baseline["params"]),
            "reaches": reaches,
            "runs_s": baseline_runs,
            "s": statistics.median(baseline_runs),
        },
        f"{BASELINE}_s_over_{REFERENCE}_request_s": statistics.median(baseline_runs) / request_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.equal_forgetting", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    ctx = make_context(args.profile)
    grid = RESULTS / ctx.profile / "tune.json"
    if not grid.exists():
        raise SystemExit(f"{grid} missing: run `python -m bench.tune --profile {ctx.profile}` first")
    payload = stamp(ctx, measure(ctx, read_json(grid), args.repeats))
    write_json(RESULTS / ctx.profile / "equal_forgetting.json", payload)
    print(json.dumps({k: payload[k] for k in (REFERENCE, BASELINE)}, indent=2))


if __name__ == "__main__":
    main()
