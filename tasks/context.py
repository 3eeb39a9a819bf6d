"""What every stage needs to know about the run it belongs to: settings, where outputs go, provenance."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from codeunlearn.config import deep_merge, load_settings, profile_outputs, settings_hash
from codeunlearn.data.records import read_jsonl_records
from codeunlearn.data.splits import split_retain_by_author
from codeunlearn.data.tofu import load_tofu_file
from codeunlearn.methods import get_method
from codeunlearn.metrics.sets import EvalSets, EvalSpec, PassageSpec, evenly_spaced, truth_ratio_records

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO_ROOT / "params.yaml"
# flows.tune's summary under the run's outputs: each method's grid and selected point (tasks/tune.py writes
# it, the tuned comparison and the benches read it).
TUNE_SUMMARY = Path("tune") / "tune.json"


def git_commit(root: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads for a block (None or 0: leave them). A tiny model decodes fastest on one
    thread (no OpenMP spinning), and two fine-tunes side by side each take one core."""
    if not threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class RunContext:
    settings: dict[str, Any]
    root: Path = REPO_ROOT
    parent_run_id: str | None = None
    extra_tags: dict[str, str] = field(default_factory=dict)
    # The commit of the code this run loaded, read once when the context is made: a commit made while
    # a long flow runs (its workers included, which receive this context) must not be stamped on it.
    commit: str = ""

    @property
    def git_commit(self) -> str:
        return self.commit or git_commit(self.root)

    @property
    def profile(self) -> str:
        return self.settings["profile"]

    @property
    def out_dir(self) -> Path:
        return profile_outputs(self.settings, self.root)

    @property
    def cache_dir(self) -> Path:
        return self.resolve(self.settings["paths"]["cache"])

    @property
    def params_hash(self) -> str:
        return settings_hash(self.settings)

    def retain_split(self) -> tuple[list, list]:
        """(control, scored) retain records: the ``select.control_authors`` a selection, a gate or a
        baseline may use, and the other authors, whose retain score is therefore not protected by
        construction (``codeunlearn.data.splits.split_retain_by_author``)."""
        retain = read_jsonl_records(self.stage_dir("splits") / "retain.jsonl")
        return split_retain_by_author(retain, self.settings["select"]["control_authors"])

    def eval_spec(self) -> EvalSpec:
        """How ``evaluate`` scores a model: decoding budget and batches, scored length, Min-K ratio."""
        cfg = self.settings["evaluate"]
        return EvalSpec(
            max_new_tokens=cfg["max_new_tokens"],
            batch_size=cfg["batch_size"],
            score_batch_size=cfg["score_batch_size"],
            max_length=cfg["max_length"],
            min_k=cfg["mia"]["min_k"],
            passage=PassageSpec(**self.settings["forget_set"]["passage"]),
        )

    def utility_sets(self) -> EvalSets:
        """What model utility is measured on (no forget set): the scored retain authors' QAs that carry
        perturbed answers, real authors and world facts, sized as ``evaluate`` says."""
        cfg = self.settings["evaluate"]
        tofu_dir = self.resolve(self.settings["paths"]["tofu_dir"])
        scored = truth_ratio_records(self.retain_split()[1], "retain")
        extra = {
            kind: evenly_spaced(load_tofu_file(tofu_dir / f"{kind}_perturbed.json"), cfg[f"{kind}_size"])
            if cfg[f"{kind}_size"] >= 0
            else []
            for kind in ("real_authors", "world_facts")
        }
        return EvalSets(forget=[], retain=evenly_spaced(scored, cfg["retain_eval_size"]), **extra)

    def eval_sets(self) -> EvalSets:
        """The evaluation records: forget with truth-ratio data, the model-utility sets (``utility_sets``),
        the MIA holdout."""
        cfg = self.settings["evaluate"]
        splits = self.stage_dir("splits")
        forget = truth_ratio_records(read_jsonl_records(splits / "forget.jsonl"), "forget")
        utility = self.utility_sets()
        for kind, records in (("forget", forget), ("retain", utility.retain)):
            if not records:
                raise ValueError(f"{kind}: no record carries the perturbed answers the truth ratio needs")
        holdout_file = cfg["mia"]["holdout_file"]
        tofu_dir = self.resolve(self.settings["paths"]["tofu_dir"])
        holdout = (
            load_tofu_file(tofu_dir / holdout_file) if holdout_file else read_jsonl_records(splits / "holdout.jsonl")
        )
        holdout = evenly_spaced(holdout, cfg["mia"]["holdout_size"])
        if not holdout:
            log.warning("no holdout records: membership inference and PrivLeak are skipped")
        return EvalSets(
            forget=evenly_spaced(forget, cfg["forget_eval_size"]),
            retain=utility.retain,
            real_authors=utility.real_authors,
            world_facts=utility.world_facts,
            holdout=holdout,
        )

    @property
    def progress(self) -> bool:
        return bool(self.settings.get("progress", True))

    def resolve(self, path: str) -> Path:
        candidate = Path(path)
        return candidate if candidate.is_absolute() else (self.root / candidate).resolve()

    def stage_dir(self, name: str) -> Path:
        return self.out_dir / name

    def apply_threads(self) -> None:
        """torch's intra-op threads for this process (and for every worker process a task lands in)."""
        threads = int(self.settings.get("threads") or 0)
        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def method_params(self, method: str, provenance: dict[str, Any]) -> dict[str, Any]:
        """A method's params block (where the method keeps it), with the run's seed and progress flag."""
        block = get_method(method).params(self.settings)
        return {**block, "seed": self.settings["seed"], "progress": self.progress, "provenance": provenance}

    def with_method_params(self, method: str, params: dict[str, Any]) -> RunContext:
        """This run with ``params`` set in ``method``'s params block: a tuning point, a tuned comparison."""
        return replace(self, settings=deep_merge(self.settings, get_method(method).params_override(params)))

    def with_parent(self, run_id: str | None) -> RunContext:
        return replace(self, parent_run_id=run_id)

    def resuming(self) -> RunContext:
        """The same run with ``resume`` on: stages finished under the same settings are reused."""
        return replace(self, settings={**self.settings, "resume": True})


def make_context(
    profile: str | None = None, params_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> RunContext:
    settings = load_settings(params_file or PARAMS_FILE, profile, overrides)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = RunContext(settings=settings, commit=git_commit())
    ctx.apply_threads()
    return ctx
