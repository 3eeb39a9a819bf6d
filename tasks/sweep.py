"""The S' sweep: forget vs retain ROUGE of CodeUnlearn under each control, beside the random control."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.data.records import read_jsonl_records
from codeunlearn.eval.sweep import frontier
from codeunlearn.io import write_json
from codeunlearn.methods.codeunlearn.gate import gate_calibration
from codeunlearn.methods.codeunlearn.select import SelectionSpec
from codeunlearn.metrics.scoring import forget_retain_rouge
from codeunlearn.metrics.sets import GenerationSpec, evenly_spaced
from codeunlearn.report.plots import FRONTIER_PLOT, frontier_plot
from tasks import tracking
from tasks.common import load_role
from tasks.context import RunContext
from tasks.resume import resumable


@task(name="sweep", cache_policy=NONE)
@resumable("sweep")
def sweep(ctx: RunContext) -> list[dict]:
    splits = ctx.stage_dir("splits")
    forget = read_jsonl_records(splits / "forget.jsonl")
    retain_all, retain_scored = ctx.retain_split()
    select = ctx.settings["select"]
    evaluate_cfg = ctx.settings["evaluate"]
    retain_eval = evenly_spaced(retain_scored, evaluate_cfg["retain_eval_size"])
    generation = GenerationSpec(evaluate_cfg["max_new_tokens"], evaluate_cfg["batch_size"])
    checkpoint = load_role(ctx, "codebook")
    spec = SelectionSpec(**{name: select[name] for name in SelectionSpec.__dataclass_fields__})

    def score() -> dict[str, float]:
        return forget_retain_rouge(checkpoint.model, checkpoint.tokenizer, forget, retain_eval, generation)

    rows = frontier(
        checkpoint.model,
        checkpoint.bottleneck,
        checkpoint.tokenizer,
        forget,
        retain_all,
        spec,
        select["sweep_controls"],
        select["sweep"],
        select["name_min_mentions"],
        score,
        ctx.settings["seed"],
        selections=select["sweep_selections"],
        gate=gate_calibration(select["gate"], spec),
        codes_per_round=select["sweep_codes_per_round"],
    )
    out = ctx.stage_dir("sweep")
    write_json(out / "frontier.json", rows)
    frontier_plot(rows, out / FRONTIER_PLOT)
    with tracking.stage_run(ctx, "sweep"):
        for row in rows:
            prefix = f"sweep.{row['selection']}.{row['control']}".replace("-", "none")
            tracking.log_metrics({f"{prefix}.{k}": row[k] for k in ("forget_rouge", "retain_rouge")}, step=row["size"])
        tracking.log_artifacts(out, "sweep")
    return rows
