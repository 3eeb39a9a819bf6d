"""The studies' report (``flows.studies``): the S' frontier, sustainability and scalability.

Like the run report it holds numbers only, never the forget set's text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from codeunlearn.report.tables import markdown_table, metric_table

SUSTAINABILITY_COLUMNS = {
    "disabled": "codes disabled",
    "forget_rouge_current_before": "new request before",
    "forget_rouge_current": "new request after ↓",
    "forget_rouge_first": "first request ↓",
    "forget_rouge_requested": "all requested ↓",
    "forget_rouge_pending": "not yet requested",
    "retain_rouge": "retain ↑",
    "random_forget_rouge_requested": "random: all requested",
    "random_retain_rouge": "random: retain",
}


SCALABILITY_COLUMNS = {
    "forget_size": "forget QAs",
    "disabled": "codes disabled",
    "forget_rouge_before": "forget before",
    "forget_rouge": "forget after ↓",
    "retain_rouge": "retain ↑",
    "random_forget_rouge": "random: forget",
    "random_retain_rouge": "random: retain",
    "model_utility": "model utility ↑",
    "world_facts_rouge": "world facts ↑",
}


def frontier_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Forget / retain ROUGE per S' (columns) for every selection and control (rows)."""
    sizes = sorted({r["size"] for r in rows if r["size"]})
    series = sorted({(r["selection"], r["control"]) for r in rows if r["size"]})
    body = []
    for selection, control in series:
        cells = {r["size"]: r for r in rows if (r["selection"], r["control"]) == (selection, control)}
        pairs = (
            f"{cells[n]['forget_rouge']:.3f} / {cells[n]['retain_rouge']:.3f}" if n in cells else "n/a" for n in sizes
        )
        body.append([selection, control, *pairs])
    lines = markdown_table(["selection", "control", *(f"S'={n}" for n in sizes)], body).split("\n")
    base = next((r for r in rows if not r["size"]), None)
    if base is not None:
        lines += [
            "",
            f"Cells are forget / retain ROUGE-L recall; without a mask: {base['forget_rouge']:.3f} / "
            f"{base['retain_rouge']:.3f}.",
        ]
    return lines


def _counts_as_int(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: int(v) if k in ("disabled", "forget_size", "authors") else v for k, v in row.items()}


def sequential_lines(sequential: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Sustainability and scalability tables (``sequential/*.json``); empty when neither ran."""
    lines: list[str] = []
    sus = sequential.get("sustainability") or {}
    scal = sequential.get("scalability") or {}
    if not sus and not scal:
        return lines
    lines += ["", "### Sustainability: sequential requests", ""]
    if sus.get("rows"):
        rows = {str(int(row["request"])): _counts_as_int(row) for row in sus["rows"]}
        base = sus["baseline"]
        notes = (sus.get("plan") or {}).get("notes") or []
        lines += [
            metric_table(rows, SUSTAINABILITY_COLUMNS, label="request"),
            "",
            "Authors are requested one at a time (the forget split's, then the retain split's); each request "
            "selects its codes on the model the earlier requests left and adds them to the mask. Cells are "
            "forget ROUGE-L recall on each request's QAs and retain ROUGE on the authors no request touches "
            f"(before any request: first request {base['forget_rouge_first']:.3f}, retain "
            f"{base['retain_rouge']:.3f}). `random` is a random mask of the same total size.",
            *(f"- {note}" for note in notes),
        ]
    else:
        lines.append(f"Not run: {sus.get('skipped', 'no result')}.")
    lines += ["", "### Scalability: growing forget sets", ""]
    if scal.get("rows"):
        rows = {str(int(row["authors"])): _counts_as_int(row) for row in scal["rows"]}
        notes = (scal.get("plan") or {}).get("notes") or []
        lines += [
            metric_table(rows, SCALABILITY_COLUMNS, label="authors"),
            "",
            "One request per forget-set size, each from the unmasked codebook model, with the same retain "
            f"authors at every size (retain ROUGE without a mask: {scal['baseline']['retain_rouge']:.3f}).",
            *(f"- {note}" for note in notes),
        ]
    else:
        lines.append(f"Not run: {scal.get('skipped', 'no result')}.")
    return lines


def render_studies_report(inputs: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    """Markdown report of the studies (``flows.studies``): the S' frontier, sustainability and
    scalability. Like the run report it holds numbers only, never the forget set's text."""
    lines = [
        f"# CodeUnlearn studies: profile `{inputs['profile']}`",
        "",
        f"Params hash `{inputs['params_hash'][:16]}`; codebook sha256 `{inputs['codebook_sha256'][:16]}`. "
        "The main job's report (`../report/report.md`) has the request itself; these studies vary it.",
    ]
    frontier = inputs.get("frontier") or []
    if frontier:
        lines += [
            "",
            "### The S' sweep: forget/utility frontier",
            "",
            *frontier_table(frontier),
            "",
            "Each row disables the first S' codes of one ranked selection. `one_shot` is the paper's test "
            "(one chi-squared ranking); `iterative` re-counts with the mask applied, so codes that fill "
            "in for disabled ones are found too; `random` is the matched control.",
        ]
    lines += sequential_lines(inputs.get("sequential") or {})
    lines += ["", "## Plots", "", *(f"![{title}]({path})\n" for title, path in plots.items())]
    return "\n".join(lines) + "\n"
