"""Human-readable run reports: tables of what was measured, the plots, and where every number came from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def markdown_table(rows: Mapping[str, Mapping[str, float]], columns: list[str], digits: int = 3) -> str:
    header = "| model | " + " | ".join(columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    body = [
        f"| {name} | " + " | ".join(_fmt(values.get(col), digits) for col in columns) + " |"
        for name, values in rows.items()
    ]
    return "\n".join([header, rule, *body])


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_report(inputs: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """Markdown report of one run. Holds counts, hashes and metrics only: never the forget set's text."""
    metrics = inputs["metrics"]
    columns = sorted({name for values in metrics.values() for name in values})
    splits = inputs["splits"]
    mask = inputs["mask"]
    codebook = inputs["codebook"]
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
        "",
        "## Codebook",
        "",
        f"- {codebook['live_codes']} of {codebook['num_codes']} codes live on the training data; "
        f"final answer CE {codebook['final_ce']:.3f}, reconstruction {codebook['final_reconstruction']:.3f}.",
        "",
        "## Unlearning request",
        "",
        f"- {mask['count']} codes disabled ({inputs['select']['enriched_codes']} significantly enriched on the "
        f"forget set); request latency {inputs['select']['request_latency_s']:.2f} s (no evaluation).",
        "",
        "## Results",
        "",
        markdown_table(metrics, columns),
        "",
        "`random_codes` disables as many codes as CodeUnlearn, drawn at random: the selectivity control.",
        "",
        *(f"![{title}]({path})\n" for title, path in plots.items()),
    ]
    return "\n".join(lines) + "\n"
