"""A copyright holder's request, end to end: ``python -m bench.passage_request --profile default``.

Issue 20's passage figure. MUSE-News articles stand for the holder's text: the target and the codebook
model are trained again with the source's first rows, up to the F + N articles used, in the target's
data (``finetune.passages``), as the text would have been in its training set, then ``codeunlearn forget
--forget-file <the first F distinct articles> --retain-file <the next N>`` runs in a fresh process on
them (distinct: raw/forget.json repeats some articles, and a text cannot be both forgotten and kept).
F, N and the fine-tuning steps are ``bench.passage_request`` in params.yaml.

Everything is written in a scratch folder: the request files (built from ``paths.muse_dir``, never
copied into the repository), a params file pointing the outputs there, the profile's data splits linked
read-only, the new target and codebook model, the request and its MLflow store. The oracle is not
trained (a request does not read it); the profile's outputs are never written.

Writes ``bench/results/<profile>/passage_request.json`` whole: forget VerbMem before and after, the
held-out neighbour articles' VerbMem and MUSE's KnowMem on other news before and after, their ratios
against issue 20's bars (forget <= 0.3x before, neighbours and KnowMem >= 0.9x), model utility, the
codes disabled and the audit outcome, stamped with the commit, machine and load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.generic_request import printed_result, ratios, run_fresh, write_result
from bench.run import MEASURED_COMMIT, machine
from codeunlearn.config import deep_merge, load_settings, profile_outputs
from codeunlearn.data.muse import read_json_array
from codeunlearn.io import read_json
from tasks.context import PARAMS_FILE, REPO_ROOT

# Issue 20's bars for a passage request: after / before of each figure.
BARS = {"forget_rouge": ("le", 0.3), "neighbour_verbmem": ("ge", 0.9), "knowmem_retain": ("ge", 0.9)}
# Reported beside the barred figures.
REPORTED = ("forget_min_k", "model_utility")
# The stages trained again on the articles; every other output the request needs is the profile's.
STAGES = ("finetune_target", "train_codebook")
LINKED = ("splits", "validation")  # read-only inputs of the stages and of the request's checks
BASE_POINTER = "base.json"


def distinct_articles(rows: list[Any], count: int, source: Path) -> list[tuple[int, str]]:
    """(row, text) of the first ``count`` distinct non-empty texts of a MUSE file, in file order: MUSE's
    raw/forget.json repeats some articles (rows 2 and 5 are one text), and a text cannot be both forgotten
    and kept."""
    chosen: dict[str, int] = {}
    for row, text in enumerate(rows):
        if isinstance(text, str) and text.strip() and text not in chosen:
            chosen[text] = row
            if len(chosen) == count:
                return [(row, text) for text, row in chosen.items()]
    raise ValueError(f"{source}: {len(chosen)} distinct articles, fewer than the {count} asked for")


def request_files(
    articles: list[tuple[int, str]], forget_articles: int, neighbour_articles: int, folder: Path
) -> dict[str, Path]:
    """``forget.jsonl`` (the first F ``articles``) and ``neighbours.jsonl`` (the next N) in ``folder``:
    passage records, one article each, named by their row in the source."""
    if forget_articles < 1 or neighbour_articles < 2:
        raise ValueError(
            f"bench.passage_request needs forget_articles >= 1 and neighbour_articles >= 2 (a control and a "
            f"held-out part), got {forget_articles} and {neighbour_articles}"
        )
    if len(articles) < forget_articles + neighbour_articles:
        raise ValueError(f"{len(articles)} articles, fewer than {forget_articles} + {neighbour_articles}")
    end = forget_articles + neighbour_articles
    spans = {"forget": articles[:forget_articles], "neighbours": articles[forget_articles:end]}
    files = {}
    for name, span in spans.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": f"article-{row}", "text": text}) + "\n" for row, text in span))
        files[name] = path
    return files


def scratch_outputs(profile_dir: Path, scratch: Path) -> Path:
    """``scratch/<profile>``: the profile's splits and validation linked, and a models folder holding only
    the base model's pointer (the stages write the target and codebook model beside it)."""
    target = scratch / profile_dir.name
    (target / "models").mkdir(parents=True)
    for name in LINKED:
        (target / name).symlink_to((profile_dir / name).resolve(), target_is_directory=True)
    shutil.copy2(profile_dir / "models" / BASE_POINTER, target / "models" / BASE_POINTER)
    return target


def scratch_params(profile: str, scratch: Path, cfg: dict[str, Any], passages: int) -> Path:
    """params.yaml with the outputs, the MLflow artifacts and nothing registered in ``scratch``, and the
    profile's target fine-tuned on the source's first ``passages`` texts (for ``cfg["finetune_steps"]``
    steps if set)."""
    params = yaml.safe_load(PARAMS_FILE.read_text())
    params["defaults"]["paths"]["outputs"] = str(scratch)
    params["defaults"]["tracking"].update(artifact_root=str(scratch / "mlruns"), register_models=False)
    finetune: dict[str, Any] = {"passages": {"file": cfg["source"], "count": passages}}
    if cfg["finetune_steps"] is not None:
        finetune["steps"] = cfg["finetune_steps"]
    profiles = params.setdefault("profiles", {})
    profiles[profile] = deep_merge(profiles.get(profile) or {}, {"finetune": finetune})
    path = scratch / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def measure(profile: str) -> dict[str, Any]:
    settings = load_settings(PARAMS_FILE, profile)
    cfg = settings["bench"]["passage_request"]
    profile_dir = profile_outputs(settings, REPO_ROOT)
    if not (profile_dir / "splits").is_dir() or not (profile_dir / "models" / BASE_POINTER).is_file():
        raise SystemExit(f"{profile_dir}: no splits or base model; run `python -m flows.pipeline --profile {profile}`")
    source = Path(settings["paths"]["muse_dir"])
    source = (source if source.is_absolute() else REPO_ROOT / source) / cfg["source"]
    articles = distinct_articles(read_json_array(source), cfg["forget_articles"] + cfg["neighbour_articles"], source)
    passages = articles[-1][0] + 1  # the target learns every row up to the last article chosen
    with tempfile.TemporaryDirectory(prefix="codeunlearn-passage-") as tmp:
        scratch = Path(tmp)
        files = request_files(articles, cfg["forget_articles"], cfg["neighbour_articles"], scratch)
        out_dir = scratch_outputs(profile_dir, scratch)
        params = scratch_params(profile, scratch, cfg, passages)
        train_s = {}
        for stage in STAGES:
            command = ["-m", "flows.stage", stage, "--profile", profile, "--params", str(params)]
            train_s[stage] = run_fresh(command, scratch, stage)[1]
        command = [
            "-m", "flows.cli", "forget",
            "--forget-file", str(files["forget"]), "--retain-file", str(files["neighbours"]),
            "--method", cfg["method"], "--profile", profile, "--params", str(params),
        ]  # fmt: skip
        stdout, cli_wall_s = run_fresh(command, scratch, "codeunlearn forget")
        result = printed_result(stdout)
        audit = read_json(out_dir / "requests" / result["request_id"] / "audit.json")
        target = read_json(out_dir / "models" / "target" / "training.json")
    before, after = result["metrics"]["before"], result["metrics"]["after"]
    keys = (*BARS, *REPORTED)
    moments = (("before", before), ("after", after))
    figures = {f"{key}_{when}": values.get(key) for key in keys for when, values in moments}
    checked = ratios(before, after, BARS)
    return {
        "what": (
            "a passage request (MUSE-News articles the target was fine-tuned on) with neighbour articles, "
            "via `codeunlearn forget`; forget_rouge is the forget articles' VerbMem"
        ),
        "source": cfg["source"],
        "forget_articles": cfg["forget_articles"],
        "neighbour_articles": cfg["neighbour_articles"],
        "article_rows": {
            "forget": [row for row, _ in articles[: cfg["forget_articles"]]],
            "neighbours": [row for row, _ in articles[cfg["forget_articles"] :]],
        },
        "finetune_passages": passages,
        "finetune_steps": target["steps"],
        "target_final_ce": target["final_ce"],
        **figures,
        "ratios": checked,
        "all_bars_met": all(item["met"] for item in checked.values()),
        "audit_outcome": audit["verdict"].get("outcome"),
        "audit_passed": audit["verdict"].get("passed"),
        "audit_failed": audit["verdict"].get("failed"),
        "neighbour": {k: v for k, v in audit.get("neighbour", {}).items() if k.endswith("_count")},
        "codes_disabled": result["unlearn"].get("disabled_codes"),
        "train_s": train_s,
        "cli_wall_s": cli_wall_s,
        "profile": profile,
        "machine": machine(),
        "git_commit": MEASURED_COMMIT,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()
    write_result(args.profile, "passage_request", measure(args.profile))


if __name__ == "__main__":
    main()
