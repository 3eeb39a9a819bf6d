"""The S' sweep: forget vs retain ROUGE of CodeUnlearn under each control, beside the random control."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from codeunlearn.data.records import read_jsonl_records  # noqa: E402
from codeunlearn.eval.scoring import forget_retain_rouge  # noqa: E402
from codeunlearn.eval.sets import GenerationSpec, evenly_spaced  # noqa: E402
from codeunlearn.eval.sweep import frontier  # noqa: E402
from codeunlearn.io import write_json  # noqa: E402
from codeunlearn.methods.codeunlearn.gate import gate_calibration  # noqa: E402
from codeunlearn.methods.codeunlearn.select import SelectionSpec  # noqa: E402
from tasks import tracking  # noqa: E402
from tasks.context import RunContext  # noqa: E402
from tasks.models import load_role  # noqa: E402
from tasks.resume import resumable  # noqa: E402


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    frontier_plot(rows, out / "frontier.png")
    with tracking.stage_run(ctx, "sweep"):
        for row in rows:
            prefix = f"sweep.{row['selection']}.{row['control']}".replace("-", "none")
            tracking.log_metrics({f"{prefix}.{k}": row[k] for k in ("forget_rouge", "retain_rouge")}, step=row["size"])
        tracking.log_artifacts(out, "sweep")
    return rows
