"""Benchmarks: `python -m bench.run --profile default` writes bench/results/<profile>/*.json.

Every file carries the machine (CPU model, cores, torch version) and the git commit it measured.
Needs the profile's pipeline outputs (run `python -m flows.pipeline --profile <profile>` first);
the `pipeline` benchmark runs the smoke flow itself and writes bench/results/smoke/orchestration.json
(the README commands' end-to-end times are `python -m bench.pipeline_time`'s).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow import MlflowClient

from codeunlearn.data.records import read_jsonl_records
from codeunlearn.io import read_json, write_json
from codeunlearn.lm.generation import answer_token_logprobs, generate_answers
from codeunlearn.methods import get_method
from codeunlearn.methods.codeunlearn.counting import encode_for_counting, rank_codes, shared_prefix_length
from codeunlearn.methods.codeunlearn.mask import MASK_META, load_mask, unmask
from codeunlearn.metrics.sets import evenly_spaced
from codeunlearn.profiling import ResourceMeter
from codeunlearn.report.leaderboard import leaderboard_rows
from tasks.common import load_role, method_params
from tasks.compare import SELECTION_FILE, TUNED_DIR
from tasks.context import PARAMS_FILE, REPO_ROOT, RunContext, git_commit, make_context

RESULTS = REPO_ROOT / "bench" / "results"
OVERHEAD_PROFILE = "smoke"  # Prefect/MLflow overhead is measured where it is largest relative to the work


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        # Timings on a shared machine mean little without the load they were taken under.
        "load_average_1m": os.getloadavg()[0],
    }


# The commit the measured code came from, read once at start: a commit made while a long benchmark runs
# must not be stamped on its results.
MEASURED_COMMIT = git_commit()


def stamp(ctx: RunContext, payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "profile": ctx.profile, "machine": machine(), "git_commit": MEASURED_COMMIT}


def timed(run: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


LATENCY_DEFINITIONS = {
    "codeunlearn_request_s": "median over fresh `codeunlearn forget --no-evaluate` processes of the request's "
    "request_s (its timing.json): the request flow's first task to the mask written and the new version "
    "registered; Prefect's start and evaluation outside",
    "codeunlearn_cli_s": "median wall time of those whole processes: imports, file checks, Prefect and MLflow included",
    "codeunlearn_method_s": "median of CodeUnlearn's method call on the loaded codebook model, control "
    "statistics cached",
    "npo_s": "median of NPO's method call on the loaded target model (the scope of the earlier latency.json)",
    "npo_s_over_codeunlearn_request_s": "npo_s / codeunlearn_request_s, same forget set",
    "mask_unchanged_by_cache": "the mask (ids, scores, gate) with cached control statistics equals the one "
    "recomputed with a forward pass of the control",
    "mask_equals_pipeline_mask": "the cached-statistics mask equals the mask in the profile's mask/ folder (its "
    "pipeline's select_codes); null where there is none",
    "shared_prefix": "the forget set's code ranking counted with the records' common prefix run once against a "
    "whole forward pass (select.shared_prefix): the prefix's length, tokens ranked, tokens whose top-k differ",
}


def latency(
    ctx: RunContext,
    repeats: int,
    baselines: list[str],
    baselines_from_compare: bool = False,
    params_file: Path | None = None,
) -> dict[str, Any]:
    """A request's latency (``LATENCY_DEFINITIONS``) against the baselines' unlearning step on the same
    forget set: CodeUnlearn from the codebook model, the baselines from the target model."""
    forget_file = ctx.stage_dir("splits") / "forget.jsonl"
    forget = read_jsonl_records(forget_file)
    retain, _ = ctx.retain_split()
    in_process = codeunlearn_in_process(ctx, forget, retain, repeats)
    print(f"latency: in-process CodeUnlearn {in_process}", flush=True)  # a long run shows what it measured so far
    result: dict[str, Any] = {"definitions": LATENCY_DEFINITIONS, **in_process}
    requests = []
    for _ in range(repeats):
        requests.append(request_process(ctx, forget_file, params_file))
        print(f"latency: request process {requests[-1]}", flush=True)
    result["codeunlearn_request_s"] = statistics.median(r["request_s"] for r in requests)
    result["codeunlearn_request_runs_s"] = [r["request_s"] for r in requests]
    result["codeunlearn_cli_s"] = statistics.median(r["cli_s"] for r in requests)
    result["codeunlearn_cli_runs_s"] = [r["cli_s"] for r in requests]
    result["codeunlearn_request_control_statistics"] = [r["control_statistics"] for r in requests]
    if baselines_from_compare:
        # The comparison already timed each baseline's unlearning step on the same model and forget set
        # (two Dask workers side by side, so under each other's load); reuse it instead of retraining.
        for method in baselines:
            stats = read_json(ctx.stage_dir("compare") / method / "stats.json")
            result[f"{method}_s"] = stats["wall_s"]
            result[f"{method}_peak_mem_mb"] = stats["peak_mem_mb"]
        result["baselines_timed_in"] = "compare"
    else:
        target = load_role(ctx, "target")
        for method in baselines:
            params = ctx.method_params(method, {})
            runs, peaks = time_unlearning(target, method, forget, retain, params, repeats, "latency")
            result[f"{method}_s"] = statistics.median(runs)
            result[f"{method}_runs_s"] = runs
            result[f"{method}_peak_mem_mb"] = max(peaks)
    if "npo_s" in result:
        result["npo_s_over_codeunlearn_request_s"] = result["npo_s"] / result["codeunlearn_request_s"]
    return result


def time_unlearning(
    checkpoint: Any, method: str, forget: list, retain: list, params: dict[str, Any], repeats: int, label: str
) -> tuple[list[float], list[float]]:
    """``method``'s unlearning call on the loaded ``checkpoint``, ``repeats`` times: wall seconds and peak MB."""
    runs, peaks = [], []
    for _ in range(repeats):
        with ResourceMeter() as meter:
            get_method(method).unlearn(checkpoint.model, checkpoint.tokenizer, forget, retain, params)
        runs.append(meter.wall_s)
        peaks.append(meter.peak_mem_mb)
        print(f"{label}: {method} {meter.wall_s:.1f} s", flush=True)
    return runs, peaks


def codeunlearn_in_process(ctx: RunContext, forget: list, retain: list, repeats: int) -> dict[str, Any]:
    """The method call on the loaded codebook model: once recomputing everything (no statistics), then with
    the control statistics cached (their first use computes and saves them, untimed); the masks compared."""
    codebook = load_role(ctx, "codebook")
    prefix_check = shared_prefix_check(ctx, codebook, forget)
    cached_params = method_params(ctx, "codeunlearn", {})
    fresh_params = {k: v for k, v in cached_params.items() if k != "statistics_dir"}

    def request(params: dict[str, Any]) -> Any:
        unmask(codebook.bottleneck)
        return get_method("codeunlearn").unlearn(codebook.model, codebook.tokenizer, forget, retain, params)

    recomputed = request(fresh_params)
    warm = request(cached_params)
    median, runs = timed(lambda: request(cached_params), repeats)
    cached = request(cached_params)
    unmask(codebook.bottleneck)
    masks = [r.artifacts["code_mask"] for r in (recomputed, warm, cached)]
    pipeline = ctx.stage_dir("mask")
    pipeline_mask = load_mask(pipeline) if (pipeline / MASK_META).exists() else None
    return {
        "shared_prefix": prefix_check,
        "codeunlearn_method_s": median,
        "codeunlearn_method_runs_s": runs,
        "codeunlearn_method_recomputed_s": recomputed.stats["select_s"],
        "control_statistics_first_use": warm.stats["control_statistics"],
        "mask_unchanged_by_cache": all(
            (m.disabled_ids, m.scores, m.gate) == (masks[0].disabled_ids, masks[0].scores, masks[0].gate) for m in masks
        ),
        "mask_disabled_codes": len(masks[0].disabled_ids),
        # The pipeline's select_codes mask (as the profile's last pipeline run wrote it) against the cached one.
        "mask_equals_pipeline_mask": None
        if pipeline_mask is None
        else (pipeline_mask.disabled_ids, pipeline_mask.scores, pipeline_mask.gate)
        == (masks[-1].disabled_ids, masks[-1].scores, masks[-1].gate),
    }


def shared_prefix_check(ctx: RunContext, codebook: Any, forget: list) -> dict[str, Any]:
    """``LATENCY_DEFINITIONS["shared_prefix"]`` on the profile's codebook model and forget set."""
    select = ctx.settings["select"]
    counting = {"batch_size": select["batch_size"], "max_length": select["max_length"], "positions": "all"}
    k = codebook.bottleneck.spec.k
    model, bottleneck, tokenizer = codebook.model, codebook.bottleneck, codebook.tokenizer
    rankings = [
        rank_codes(model, bottleneck, tokenizer, forget, depth=k, shared_prefix=on, **counting) for on in (False, True)
    ]
    whole, shared = (ranking.ids[:, :k] for ranking in rankings)
    encoded = encode_for_counting(codebook.tokenizer, forget, select["max_length"])
    return {
        "prefix_tokens": shared_prefix_length(encoded),
        "tokens_ranked": int(whole.shape[0]),
        "tokens_top_k_differ": int((whole != shared).any(-1).sum()),
    }


def request_process(ctx: RunContext, forget_file: Path, params_file: Path | None) -> dict[str, Any]:
    """One fresh `codeunlearn forget --no-evaluate` process on the profile's models, in a scratch outputs
    folder (links to the profile's models and splits, its own requests folder) and MLflow store, so every
    run is a first request and nothing is added to the profile's deployed mask or registry."""
    with tempfile.TemporaryDirectory(prefix="codeunlearn-latency-") as scratch:
        root = Path(scratch)
        outputs = root / "outputs" / ctx.profile
        outputs.mkdir(parents=True)
        for shared in ("models", "splits"):
            (outputs / shared).symlink_to(ctx.stage_dir(shared), target_is_directory=True)
        params = root / "params.yaml"
        settings = yaml.safe_load((params_file or PARAMS_FILE).read_text())
        settings["defaults"]["paths"]["outputs"] = str(root / "outputs")
        settings["defaults"]["tracking"]["artifact_root"] = str(root / "mlruns")
        params.write_text(yaml.safe_dump(settings, sort_keys=False))
        uri = f"sqlite:///{root / 'mlflow.db'}"
        MlflowClient(tracking_uri=uri).search_experiments()  # the store's schema is made here, outside cli_s
        command = [sys.executable, "-m", "flows.cli", "forget", "--forget-file", str(forget_file), "--no-evaluate"]
        command += ["--profile", ctx.profile, "--params", str(params)]
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO_ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
        cli_s = time.perf_counter() - started
        (request,) = (outputs / "requests").glob("*/timing.json")
        unlearned = read_json(request.with_name("unlearn.json"))
        return {
            "request_s": read_json(request)["request_s"],
            "cli_s": cli_s,
            "control_statistics": unlearned["control_statistics"],
        }


OVERHEAD_ROLES = {"base": "target", "codebook": "codebook"}


def overhead(ctx: RunContext, prompts: int, repeats: int) -> dict[str, Any]:
    """Tokens per second of the target vs the codebook model: greedy generation and teacher-forced scoring.

    Both models are loaded and warmed up (one untimed pass each) first; the timed passes then alternate
    which model goes first, so neither gains from running second (caches, CPU clocks). Medians of ``repeats``.
    """
    cfg = ctx.settings["evaluate"]
    records = evenly_spaced(read_jsonl_records(ctx.stage_dir("splits") / "retain.jsonl"), prompts)
    questions = [r.question for r in records]
    pairs = [(r.question, r.answer) for r in records]
    models = {label: load_role(ctx, role) for label, role in OVERHEAD_ROLES.items()}

    def rates(checkpoint: Any) -> tuple[float, float]:
        started = time.perf_counter()
        answers = generate_answers(
            checkpoint.model, checkpoint.tokenizer, questions, cfg["max_new_tokens"], cfg["batch_size"]
        )
        gen_s = time.perf_counter() - started
        gen_tokens = sum(len(checkpoint.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        started = time.perf_counter()
        answer_token_logprobs(checkpoint.model, checkpoint.tokenizer, pairs, cfg["score_batch_size"], cfg["max_length"])
        score_s = time.perf_counter() - started
        scored = sum(len(checkpoint.tokenizer(f"{q} {a}")["input_ids"]) for q, a in pairs)
        return gen_tokens / gen_s, scored / score_s

    for checkpoint in models.values():
        rates(checkpoint)  # warm-up, untimed
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in models}
    for repeat in range(repeats):
        order = list(models) if repeat % 2 == 0 else list(reversed(models))
        for label in order:
            runs[label].append(rates(models[label]))
    result: dict[str, Any] = {"repeats": repeats, "order": "alternating, after one warm-up pass of each model"}
    for label, measured in runs.items():
        result[f"{label}_generation_tokens_per_s"] = statistics.median(g for g, _ in measured)
        result[f"{label}_scoring_tokens_per_s"] = statistics.median(s for _, s in measured)
        result[f"{label}_runs_tokens_per_s"] = [{"generation": g, "scoring": s} for g, s in measured]
    result["base_tokens_per_s"] = result["base_scoring_tokens_per_s"]
    result["codebook_tokens_per_s"] = result["codebook_scoring_tokens_per_s"]
    result["ratio"] = result["codebook_tokens_per_s"] / result["base_tokens_per_s"]
    result["generation_ratio"] = result["codebook_generation_tokens_per_s"] / result["base_generation_tokens_per_s"]
    result["codebook_flops_share"] = codebook_flops_share(ctx)
    return result


def codebook_flops_share(ctx: RunContext) -> float:
    """Analytic share of per-token FLOPs spent in the bottleneck: the N_c x d similarity matmul against
    the model's 2 x parameters multiply-adds per token."""
    checkpoint = load_role(ctx, "codebook")
    spec = checkpoint.bottleneck.spec
    codebook_flops = 2 * spec.num_codes * checkpoint.bottleneck.dim
    model_flops = 2 * sum(p.numel() for p in checkpoint.model.parameters())
    return codebook_flops / (codebook_flops + model_flops)


def pipeline_overhead(params_file: Path | None) -> dict[str, Any]:
    """The whole smoke flow (Prefect + MLflow + every main-job stage) against the same stages called as
    plain functions without Prefect, both from scratch (resume off). MLflow logging is inside both: the
    stages log themselves; the difference is Prefect and the flow's parent run. The end-to-end times of
    the README's commands are ``bench.pipeline_time``'s (a fresh clone), not derived here."""
    from flows.pipeline import pipeline
    from flows.registry import TASKS
    from tasks.stages import PIPELINE

    started = time.perf_counter()
    pipeline(profile=OVERHEAD_PROFILE, params_file=str(params_file) if params_file else None, resume=False)
    flow_s = time.perf_counter() - started
    plain = make_context(OVERHEAD_PROFILE, params_file, overrides={"resume": False})
    started = time.perf_counter()
    for name in PIPELINE:
        TASKS[name].fn(plain)
    library_s = time.perf_counter() - started
    return {
        "flow_s": flow_s,
        "library_only_s": library_s,
        "overhead_ratio": flow_s / library_s,
        "mlflow": "inside both times (the stages log themselves); the ratio is Prefect and the flow's parent run",
    }


def leaderboard_payload(ctx: RunContext) -> dict[str, Any]:
    """The pipeline's own rows (target, oracle, codebook model, CodeUnlearn, random codes: ``eval/``) and,
    where the profile's comparison and tuning ran, their rows; each part names the commit that produced it."""
    payload: dict[str, Any] = {}
    parts = (
        ("pipeline", ctx.stage_dir("eval") / "metrics.json", "pipeline_rows"),
        ("compare", ctx.stage_dir("compare") / "leaderboard.json", "rows"),
        # Each method at its tuned point, attacks included (``python -m flows.compare --tuned``).
        ("tuned_compare", ctx.stage_dir("compare") / TUNED_DIR / "leaderboard.json", "tuned_compare_rows"),
    )
    for part, path, key in parts:
        if not path.exists():
            print(f"{path} missing: no {part} rows")
            continue
        run = path.with_name("run.json")
        rows = read_json(path)
        payload[key] = leaderboard_rows(rows) if part == "pipeline" else rows
        payload[f"{part}_git_commit"] = read_json(run)["git_commit"] if run.exists() else None
        if (selection := path.with_name(SELECTION_FILE)).exists():
            payload[f"{part}_selection"] = read_json(selection)["selection"]
    tuned = ctx.stage_dir("tune") / "tune.json"
    if tuned.exists():
        # Each method's point selected by the tuning rule, with its params (``python -m flows.tune``).
        summary = read_json(tuned)
        payload["tuned_rows"] = summary["leaderboard"]
        payload["tune_git_commit"] = summary["git_commit"]
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--only", nargs="*", default=["latency", "overhead", "pipeline", "leaderboard"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", type=Path, default=None)
    parser.add_argument("--baselines", nargs="*", default=None, help="baselines to time (default: bench.baselines)")
    parser.add_argument(
        "--baselines-from-compare",
        action="store_true",
        help="take the baselines' unlearning times from the profile's comparison run instead of rerunning them",
    )
    args = parser.parse_args(argv)
    ctx = make_context(args.profile, args.params)
    bench = ctx.settings["bench"]
    out = RESULTS / ctx.profile
    baselines = bench["baselines"] if args.baselines is None else args.baselines
    if "pipeline" in args.only:
        write_json(RESULTS / OVERHEAD_PROFILE / "orchestration.json", stamp(ctx, pipeline_overhead(args.params)))
    if "latency" in args.only:
        write_json(
            out / "latency.json",
            stamp(ctx, latency(ctx, args.repeats, baselines, args.baselines_from_compare, args.params)),
        )
    if "overhead" in args.only:
        measured = overhead(ctx, bench["overhead_prompts"], bench["overhead_repeats"])
        write_json(out / "overhead.json", stamp(ctx, measured))
    if "leaderboard" in args.only:
        write_json(out / "leaderboard.json", stamp(ctx, leaderboard_payload(ctx)))
    for path in sorted(out.glob("*.json")):
        print(path)


if __name__ == "__main__":
    main()
