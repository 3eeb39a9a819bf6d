"""Stage 8: score target, oracle, codebook, CodeUnlearn and the matched random-code control side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from codeunlearn.data import read_jsonl_records  # noqa: E402
from codeunlearn.evaluation import GenerationSpec, evenly_spaced, forget_retain_rouge  # noqa: E402
from codeunlearn.io import write_json  # noqa: E402
from codeunlearn.masking import apply_mask, load_mask, random_mask_like, unmask  # noqa: E402
from tasks import tracking  # noqa: E402
from tasks.context import RunContext  # noqa: E402
from tasks.models import load_role  # noqa: E402

ROWS = ("target", "oracle", "codebook", "codeunlearn", "random_codes")


def rouge_plot(metrics: dict[str, dict[str, float]], path: Path) -> None:
    names = list(metrics)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, [metrics[n]["forget_rouge"] for n in names], 0.4, label="forget (lower is better)")
    ax.bar(x + 0.2, [metrics[n]["retain_rouge"] for n in names], 0.4, label="retain (higher is better)")
    ax.set_xticks(x, names)
    ax.set_ylabel("ROUGE-L recall")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


@task(name="evaluate", cache_policy=NONE)
def evaluate(ctx: RunContext) -> dict:
    splits = ctx.stage_dir("splits")
    cfg = ctx.settings["evaluate"]
    forget = read_jsonl_records(splits / "forget.jsonl")
    retain = evenly_spaced(read_jsonl_records(splits / "retain.jsonl"), cfg["retain_eval_size"])
    spec = GenerationSpec(cfg["max_new_tokens"], cfg["batch_size"])

    def score(checkpoint) -> dict[str, float]:
        return forget_retain_rouge(checkpoint.model, checkpoint.tokenizer, forget, retain, spec, ctx.progress)

    metrics = {role: score(load_role(ctx, role)) for role in ("target", "oracle")}
    codebook_model = load_role(ctx, "codebook")
    metrics["codebook"] = score(codebook_model)
    mask = load_mask(ctx.stage_dir("mask"))
    apply_mask(codebook_model.bottleneck, mask, source=str(ctx.stage_dir("mask")))
    metrics["codeunlearn"] = score(codebook_model)
    unmask(codebook_model.bottleneck)
    control = random_mask_like(mask, np.random.default_rng(ctx.settings["seed"]))
    apply_mask(codebook_model.bottleneck, control)
    metrics["random_codes"] = score(codebook_model)
    unmask(codebook_model.bottleneck)

    out = ctx.stage_dir("eval")
    write_json(out / "metrics.json", metrics)
    rouge_plot(metrics, out / "rouge.png")
    with tracking.stage_run(ctx, "evaluate"):
        tracking.log_metrics(
            {f"{row}.{name}": value for row, values in metrics.items() for name, value in values.items()}
        )
        tracking.log_artifacts(out, "eval")
    return metrics
