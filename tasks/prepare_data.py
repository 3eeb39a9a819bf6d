"""Stage 1: load TOFU into the common schema, cut forget / retain / holdout by author, record hashes."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.data.records import write_jsonl
from codeunlearn.data.splits import Splits, split_by_author, split_summary
from codeunlearn.data.tofu import attach_perturbations, load_tofu_file
from codeunlearn.io import write_json
from tasks import tracking
from tasks.context import RunContext
from tasks.resume import resumable

SPLITS = ("forget", "retain", "holdout")


@task(name="prepare_data", cache_policy=NONE)
@resumable("prepare_data")
def prepare_data(ctx: RunContext) -> dict:
    data = ctx.settings["data"]
    tofu_dir = ctx.resolve(ctx.settings["paths"]["tofu_dir"])
    records = load_tofu_file(tofu_dir / data["source_file"])
    perturbed = [r for name in data["perturbed_files"] for r in load_tofu_file(tofu_dir / name)]
    cut = split_by_author(records, data["forget_authors"], data["retain_authors"], data["holdout_authors"])
    splits = Splits(*(attach_perturbations(getattr(cut, name), perturbed) for name in SPLITS))
    summary = split_summary(splits)
    out = ctx.stage_dir("splits")
    for name in SPLITS:
        write_jsonl(getattr(splits, name), out / f"{name}.jsonl")
    write_json(out / "summary.json", summary)
    with tracking.stage_run(ctx, "prepare_data"):
        tracking.log_metrics({k: v for k, v in summary.items() if k.endswith(("_count", "_authors"))})
        tracking.log_flat_params({f"data.{k}": v for k, v in summary.items() if k.endswith("_sha256")})
        tracking.log_artifacts(out / "summary.json")
    return summary
