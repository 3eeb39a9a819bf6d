"""Human-readable run reports: tables of what was measured, the plots, and where every number came from.

Numbers, ids, counts and hashes only: the report never quotes the forget set or a model's answers to
it. The one text it shows is the general-knowledge check: world-fact questions (public facts, not the
request's data) with the target's and the deployed model's answers side by side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from codeunlearn.report.tables import markdown_table, metric_table

# Rows in reading order (metrics.json is written with sorted keys); other rows follow.
ROW_ORDER = ("target", "oracle", "codebook", "codeunlearn", "random_codes")
# Column key -> header, per table; a key missing from a row renders as "n/a".
HEADLINE_COLUMNS = {
    "forget_rouge": "forget ROUGE ↓",
    "retain_rouge": "retain ROUGE ↑",
    "model_utility": "model utility ↑",
    "world_facts_rouge": "world facts ROUGE ↑",
    "real_authors_rouge": "real authors ROUGE ↑",
    "forget_quality": "forget quality ↑",
}
FORGET_COLUMNS = {
    "forget_rouge": "forget ROUGE ↓",
    "forget_prob": "forget Prob ↓",
    "forget_truth_ratio": "forget TR",
    "forget_quality": "forget quality ↑",
}
RETAIN_COLUMNS = {
    "retain_rouge": "retain ROUGE ↑",
    "retain_prob": "retain Prob ↑",
    "retain_truth_ratio": "retain TR ↑",
    "retain_utility": "retain utility ↑",
}
WORLD_COLUMNS = {
    "real_authors_rouge": "RA ROUGE",
    "real_authors_prob": "RA Prob",
    "real_authors_truth_ratio": "RA TR",
    "world_facts_rouge": "WF ROUGE",
    "world_facts_prob": "WF Prob",
    "world_facts_truth_ratio": "WF TR",
    "model_utility": "model utility ↑",
}
MIA_COLUMNS = {
    "mia_min_k_auc": "Min-K% AUC",
    "mia_loss_auc": "LOSS AUC",
    "privleak": "PrivLeak (Min-K%) →0",
    "privleak_loss": "PrivLeak (LOSS) →0",
}
QUANT_COLUMNS = {
    "quantizer": "quantizer",
    "bits": "bits",
    "group_size": "group",
    "forget_rouge_full": "forget ROUGE full",
    "forget_rouge": "forget ROUGE quantized",
    "recovery": "recovery",
    "retain_rouge": "retain ROUGE quantized",
    "retain_change": "retain change",
    "forget_quality": "forget quality quantized",
    "weight_error": "weight rel. error",
}
RELEARN_COLUMNS = {
    "heldout_rouge_before": "held-out ROUGE before",
    "heldout_rouge_after": "held-out ROUGE after",
    "recovery": "recovery",
    "excess_over_oracle": "after − oracle after",
    "attack_half_rouge_after": "attacked-half ROUGE after",
    "final_loss": "final loss",
}
MUSE_COLUMNS = {
    "muse_verbmem_rouge": "VerbMem ROUGE-L F1",
    "muse_knowmem_forget_rouge": "KnowMem forget",
    "muse_knowmem_retain_rouge": "KnowMem retain ↑",
    "muse_privleak_auc": "Min-40% AUC",
    "muse_privleak": "PrivLeak →0",
}
CODE_COLUMNS = {
    "masked_usage_forget": "forget code slots disabled",
    "masked_usage_retain": "retain code slots disabled",
    "selectivity": "forget / retain",
}


def quantization_rows(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per (model, quantizer spec), with the model's full-precision forget ROUGE beside it."""
    rows: dict[str, dict[str, Any]] = {}
    for model, values in metrics.items():
        ordered = sorted((values.get("quant") or {}).items(), key=lambda item: (-item[1].get("bits", 0), item[0]))
        for name, quant in ordered:
            bits = quant.get("bits")
            rows[f"{model} / {name}"] = {
                **quant,
                "quantizer": name.split("_w")[0],
                "bits": int(bits) if bits is not None else None,
                "group_size": int(quant["group_size"]) if quant.get("group_size") is not None else None,
                "forget_rouge_full": values.get("forget_rouge"),
            }
    return rows


def relearn_rows(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    oracle_after = (metrics.get("oracle", {}).get("relearn") or {}).get("heldout_rouge_after")
    rows = {}
    for model, values in metrics.items():
        relearn = values.get("relearn")
        if not relearn:
            continue
        excess = None if oracle_after is None else relearn["heldout_rouge_after"] - oracle_after
        rows[model] = {**relearn, "excess_over_oracle": excess}
    return rows


def code_rows(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    rows = {}
    for model in ("codeunlearn", "random_codes"):
        values = metrics.get(model, {})
        if "masked_usage_forget" not in values:
            continue
        forget, retain = values["masked_usage_forget"], values["masked_usage_retain"]
        rows[model] = {
            "masked_usage_forget": forget,
            "masked_usage_retain": retain,
            "selectivity": forget / retain if retain > 0 else None,
        }
    return rows


def _skipped_quantizers(details: Mapping[str, Any]) -> list[str]:
    notes = set()
    for per_model in (details.get("quantization") or {}).values():
        for name, record in per_model.items():
            if "skipped" in record:
                notes.add(f"- `{name}` skipped: {record['skipped']}")
    return sorted(notes)


def muse_lines(metrics: Mapping[str, Mapping[str, Any]], details: Mapping[str, Any]) -> list[str]:
    """The MUSE-News table and what its numbers mean here; empty when no row has MUSE numbers."""
    rows = {name: values for name, values in metrics.items() if any(key in values for key in MUSE_COLUMNS)}
    if not rows:
        return []
    muse = details.get("muse") or {}
    sets = muse.get("sets") or {}
    spec = muse.get("spec") or {}
    lines = [
        "",
        "### MUSE-News",
        "",
        metric_table(rows, MUSE_COLUMNS),
        "",
        "MUSE's metrics (Shi et al. 2025) on its News data, 0-1 scale (MUSE's tables show ×100). **None of "
        "these models was trained on MUSE-News**: the MUSE target is fine-tuned on the News forget articles, "
        "ours on TOFU. So VerbMem (greedy continuation of forget-article prompts vs the true continuation) and "
        "KnowMem (few-shot QA on forget and retain articles) measure the general news knowledge each model "
        "brings, and the rows differ only through what training and unlearning did to it: the gap between "
        "`codeunlearn` and `codebook` is collateral damage of the mask, `random_codes` the same for a random "
        "mask. Min-40% AUC separates forget from holdout articles (MUSE orientation: about 0.5 when neither "
        "was seen); PrivLeak is (AUC − AUC_oracle) / AUC_oracle × 100 against this run's oracle, so here it "
        "exercises the machinery on real MUSE texts rather than measuring leakage of a learned forget set.",
    ]
    if sets:
        lines += [
            "",
            f"Items: {sets.get('verbmem', 0)} VerbMem prompts, {sets.get('knowmem_forget', 0)} + "
            f"{sets.get('knowmem_retain', 0)} KnowMem QAs ({sets.get('icl_examples', 0)} in-context pairs), "
            f"{sets.get('privleak_forget', 0)} + {sets.get('privleak_holdout', 0)} privleak articles (evenly "
            f"spaced subsets); {spec.get('max_new_tokens', 'n/a')} VerbMem tokens (MUSE: 128), prompts cut to "
            f"their last {spec.get('max_prompt_tokens') or 'context'} tokens, articles scored on their first "
            f"{spec.get('privleak_max_length', 'n/a')} tokens (params `evaluate.muse`).",
        ]
    timing = muse.get("timing_s") or {}
    if timing:
        lines += ["", "MUSE time per model: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()) + "."]
    return lines


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def general_check_lines(check: Mapping[str, Any]) -> list[str]:
    """World-fact questions with the gold answer, the target's and the deployed model's, side by side."""
    if not check or not check.get("questions"):
        return []
    answers = zip(check["questions"], check["gold"], check["target"], check["deployed_answers"], strict=True)
    table = markdown_table(
        ["question", "gold", "target", "deployed"], ([_cell(text) for text in row] for row in answers)
    )
    return [
        "",
        "### General knowledge, read side by side",
        "",
        f"{len(check['questions'])} TOFU world-fact questions (public facts, never the request's data), "
        f"answered greedily by the target and by the deployed model (`{check['deployed']}`).",
        "",
        *table.split("\n"),
    ]


def render_report(inputs: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """Markdown report of one run. Holds counts, hashes and metrics only: never the forget set's text."""
    metrics = {name: inputs["metrics"][name] for name in ROW_ORDER if name in inputs["metrics"]}
    metrics.update({name: values for name, values in inputs["metrics"].items() if name not in metrics})
    details = inputs.get("details") or {}
    splits = inputs["splits"]
    mask = inputs["mask"]
    codebook = inputs["codebook"]
    sets = details.get("sets", {})
    lines = [
        f"# CodeUnlearn run report: profile `{inputs['profile']}`",
        "",
        f"Params hash `{inputs['params_hash'][:16]}`; codebook sha256 `{mask['codebook_sha256'][:16]}`.",
        "",
        "## Data",
        "",
        *(
            f"- {name}: {splits[f'{name}_count']} QAs, {splits[f'{name}_authors']} authors, sha256 "
            f"`{splits[f'{name}_sha256'][:16]}`"
            for name in ("forget", "retain", "holdout")
        ),
    ]
    if sets:
        lines += [
            "- evaluated: "
            + ", ".join(
                f"{sets.get(k, 0)} {k.replace('_', ' ')}"
                for k in ("forget", "retain", "real_authors", "world_facts", "holdout")
            )
            + " items (fixed, evenly spaced subsets; see params `evaluate`)",
        ]
    lines += [
        "",
        "## Codebook",
        "",
        f"- mode `{codebook.get('mode', 'bottleneck')}`: {codebook['live_codes']} of {codebook['num_codes']} codes "
        "live on the training data; "
        + (f"final answer CE {codebook['final_ce']:.3f}, " if "final_ce" in codebook else "")
        + (f"KL to the target {codebook['final_kl']:.3f}, " if "final_kl" in codebook else "")
        + f"relative reconstruction error {codebook['final_reconstruction']:.3f}"
        + (f" on {codebook['activations']} cached activations." if "activations" in codebook else "."),
        "",
        "## Unlearning request",
        "",
        f"- {mask['count']} codes disabled ({inputs['select']['enriched_codes']} significantly enriched on the "
        f"forget set); request latency {inputs['select']['request_latency_s']:.2f} s (no evaluation).",
        "",
        "## Results",
        "",
        "Rows: `target` (trained on forget + retain), `oracle` (retain only: what forgetting should look "
        "like), `codebook` (target with the bottleneck, nothing disabled), `codeunlearn` (mask applied) and "
        "`random_codes` (as many codes disabled, drawn at random: the selectivity control).",
        "",
        "### Headline: forgetting beside model utility",
        "",
        metric_table(metrics, HEADLINE_COLUMNS),
        "",
        "Retain is scored on retain authors that neither the selection nor the gate saw (`select.control_authors`).",
        "",
        "### Forgetting (TOFU)",
        "",
        metric_table(metrics, FORGET_COLUMNS),
        "",
        "ROUGE is ROUGE-L recall of the greedy answer; Prob the length-normalised answer probability. "
        "TR is the truth-ratio statistic mean(min(R, 1/R)); on the forget set the goal is the oracle's value, "
        "not the largest one. Forget quality is the KS-test p-value of the per-item truth ratios against "
        "this run's oracle (1.0 for the oracle itself; above 0.05 = indistinguishable).",
        "",
        "### Utility (TOFU)",
        "",
        metric_table(metrics, RETAIN_COLUMNS),
        "",
        metric_table(metrics, WORLD_COLUMNS),
        "",
        "Retain TR is mean(max(0, 1 − R)). Model utility is TOFU's harmonic mean of the nine retain, "
        "real-authors (RA) and world-facts (WF) numbers; retain utility is the harmonic mean of the three "
        "retain numbers alone (a model trained from scratch knows no real authors or world facts, which "
        "pins its model utility near zero whatever unlearning does).",
        "",
        "### Membership inference",
        "",
        metric_table(metrics, MIA_COLUMNS),
        "",
        "Attack AUC of telling forget QAs (members) from holdout QAs (authors no model saw), scored on "
        "answer tokens: 1.0 = the forget set still looks trained on, 0.5 = like unseen authors. PrivLeak is "
        "MUSE's (AUC − AUC_oracle) / AUC_oracle × 100 with this run's oracle as reference: 0 is ideal, "
        "strongly negative = under-unlearned, strongly positive = over-unlearned.",
    ]
    quant = quantization_rows(metrics)
    if quant:
        lines += [
            "",
            "### Quantization attack",
            "",
            metric_table(quant, QUANT_COLUMNS, label="model / quantizer"),
            "",
            "Each model as deployed (CodeUnlearn with its mask) re-quantized, linear weights only (embeddings, "
            "LM head and the codebook stay in full precision): `rtn` is symmetric round-to-nearest with one "
            "scale per group of input columns, `torchao` its IntxWeightOnly per-group integer weights. "
            "Recovery = forget ROUGE quantized − full precision (> 0: quantization revives forgotten "
            "answers, the failure Zhang et al. 2024 found in gradient methods).",
            *_skipped_quantizers(details),
        ]
    relearn = relearn_rows(metrics)
    if relearn:
        spec = (details.get("relearn") or {}).get("spec", {})
        setup = f" ({spec['steps']} steps, batch {spec['batch_size']}, lr {spec['lr']:g})" if spec else ""
        lines += [
            "",
            "### Relearning attack",
            "",
            metric_table(relearn, RELEARN_COLUMNS),
            "",
            f"A copy of each model fine-tuned on half of the forget set{setup}; ROUGE measured on the other "
            "half, which the attack never showed. Recovery = after − before. The oracle's row is the "
            "reference: what learning the unseen half from the attacked half alone gives; a model that "
            "truly forgot should not exceed it (`after − oracle after` near 0).",
        ]
    lines += general_check_lines(inputs.get("general_check") or {})
    lines += muse_lines(metrics, details)
    codes = code_rows(metrics)
    if codes:
        lines += [
            "",
            "### Code usage",
            "",
            metric_table(codes, CODE_COLUMNS, label="mask"),
            "",
            "Share of the unmasked codebook model's code slots on the forget and the retain set that each mask "
            "disables: a selective mask takes much more of the forget set's codes than of the retain set's.",
        ]
    timing = details.get("timing_s")
    if timing:
        lines += [
            "",
            f"Evaluation took {timing['total']:.0f} s ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in timing.items() if k != "total")
            + ").",
        ]
    lines += ["", "## Plots", "", *(f"![{title}]({path})\n" for title, path in plots.items())]
    return "\n".join(lines) + "\n"
