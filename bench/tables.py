"""Markdown tables of bench/results, for the README: `python -m bench.tables [--profile default]`.

The README's benchmark tables are this command's output pasted verbatim, so they match the JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from codeunlearn.io import read_json
from codeunlearn.report.leaderboard import to_markdown
from codeunlearn.report.tables import markdown_table

RESULTS = Path(__file__).resolve().parent / "results"
LATENCY_KEYS = ("codeunlearn_request_s", "ga_s", "npo_s", "grin_s", "zerounlearn_s", "npo_over_codeunlearn")
OVERHEAD_KEYS = ("base_tokens_per_s", "codebook_tokens_per_s", "ratio", "generation_ratio", "codebook_flops_share")
ORCHESTRATION_KEYS = ("flow_s", "library_only_s", "overhead_ratio")
PIPELINE_KEYS = ("setup_s", "default_e2e_s", "default_studies_s", "smoke_e2e_s", "smoke_studies_s")


def fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def key_value_table(payload: dict[str, Any], keys: tuple[str, ...]) -> str:
    return markdown_table(["metric", "value"], ([key, fmt(payload.get(key))] for key in keys))


def provenance(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    load = m.get("load_average_1m")
    load_text = f", load average {load:.1f}" if load is not None else ""
    compared = payload.get("compare_git_commit")
    rows_from = f"; rows from the comparison at commit {compared[:10]}" if compared else ""
    if pipeline := payload.get("pipeline_git_commit"):
        rows_from += f"; pipeline rows from the pipeline's evaluation at commit {pipeline[:10]}"
    return (
        f"_{m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}{load_text}; "
        f"commit {payload['git_commit'][:10]}{rows_from}_"
    )


def section(title: str, path: Path, render) -> list[str]:
    if not path.exists():
        return [f"#### {title}", "", f"{path.relative_to(RESULTS.parent.parent)}: not measured yet", ""]
    payload = read_json(path)
    return [f"#### {title}", "", render(payload), "", provenance(payload), ""]


def leaderboard_tables(payload: dict[str, Any]) -> str:
    """The pipeline's own rows (target, oracle, codebook model, CodeUnlearn, random codes), then the
    comparison's, each where measured."""
    parts = []
    if payload.get("pipeline_rows"):
        parts += ["Pipeline (`python -m flows.pipeline`):", "", to_markdown(payload["pipeline_rows"])]
    if payload.get("rows"):
        parts += ["Comparison (`python -m flows.compare`):", "", to_markdown(payload["rows"])]
    return "\n".join(parts) if parts else "no rows"


def tables(profile: str) -> str:
    out = RESULTS / profile
    parts = [
        *section("Request latency (s)", out / "latency.json", lambda p: key_value_table(p, LATENCY_KEYS)),
        *section("Codebook overhead", out / "overhead.json", lambda p: key_value_table(p, OVERHEAD_KEYS)),
        *section("Leaderboard", out / "leaderboard.json", leaderboard_tables),
        *section(
            "The README's commands from a fresh clone (s; `python -m bench.pipeline_time`)",
            RESULTS / "default" / "pipeline.json",
            lambda p: key_value_table(p, PIPELINE_KEYS),
        ),
        *section(
            "Orchestration: the smoke flow vs its stages as plain functions (s)",
            RESULTS / "smoke" / "orchestration.json",
            lambda p: key_value_table(p, ORCHESTRATION_KEYS),
        ),
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__)
    parser.add_argument("--profile", default="default")
    print(tables(parser.parse_args(argv).profile))


if __name__ == "__main__":
    main()
