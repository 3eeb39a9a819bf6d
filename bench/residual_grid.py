"""Residual-mode CodeUnlearn on the pipeline's target: S' x strength x gate, scored by greedy ROUGE.

Trains the residual codebook exactly as the ``train_codebook`` stage does (same params, corpus and seed;
cached under --workdir), selects against the control authors, and for each grid point scores the
forget set, the held-out retain authors, world facts and real authors in one decoding batch:

    python -m bench.residual_grid --outputs data/outputs --out bench/results/default/residual_grid.json

A tuning aid for ``select.num_codes_to_disable`` / ``select.strength``; the pipeline's evaluation is the
number of record.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np

from codeunlearn.codebook_training import fit_codebook, text_chunks
from codeunlearn.data import load_tofu_file, read_jsonl_records, split_retain_by_author
from codeunlearn.evaluation import GenerationSpec, evenly_spaced, split_rouges
from codeunlearn.masking import (
    SelectionSpec,
    apply_mask,
    gate_calibration,
    gate_mask,
    random_mask_like,
    ranked_mask,
    select_mask,
    unmask,
)
from tasks.context import make_context
from tasks.models import codebook_recipe, codebook_records, codebook_texts, load_role


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outputs", type=Path, required=True, help="paths.outputs of a pipeline run (its target)")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--sizes", default="96,192,288")
    parser.add_argument("--strengths", default="1,2,4")
    parser.add_argument("--eval-size", type=int, default=20, help="QAs per scored set")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ctx = make_context(args.profile, None, overrides={"paths": {"outputs": str(args.outputs.resolve())}})
    settings = ctx.settings
    select = settings["select"]
    evaluate = settings["evaluate"]
    target = load_role(ctx, "target")
    corpus = settings["codebook"]["corpus"]
    general = text_chunks(target.tokenizer, codebook_texts(ctx), corpus["chunk_tokens"], corpus["chunks_per_text"])
    started = time.perf_counter()
    bottleneck, history = fit_codebook(
        target.model, target.tokenizer, codebook_records(ctx), general, codebook_recipe(ctx), progress=True
    )
    fit_s = time.perf_counter() - started

    splits = ctx.stage_dir("splits")
    forget = read_jsonl_records(splits / "forget.jsonl")
    control, scored = split_retain_by_author(read_jsonl_records(splits / "retain.jsonl"), select["control_authors"])
    tofu_dir = ctx.resolve(settings["paths"]["tofu_dir"])
    sets = {
        "forget": evenly_spaced(forget, args.eval_size),
        "retain_heldout": evenly_spaced(scored, args.eval_size),
        "world_facts": evenly_spaced(load_tofu_file(tofu_dir / "world_facts_perturbed.json"), args.eval_size),
        "real_authors": evenly_spaced(load_tofu_file(tofu_dir / "real_authors_perturbed.json"), args.eval_size),
    }
    generation = GenerationSpec(max_new_tokens=evaluate["max_new_tokens"], batch_size=evaluate["batch_size"])

    def score() -> dict[str, float]:
        values = split_rouges(target.model, target.tokenizer, list(sets.values()), generation)
        return dict(zip(sets, values, strict=True))

    rows = [{"name": "unmasked", **score()}]
    print(rows[-1], flush=True)
    sizes = [int(v) for v in args.sizes.split(",")]
    spec = SelectionSpec(
        **{
            **{name: select[name] for name in SelectionSpec.__dataclass_fields__},
            "num_codes_to_disable": max(sizes),
            "rounds": 1,
        }
    )
    full, _ = select_mask(target.model, bottleneck, target.tokenizer, forget, control, spec, {"bench": "residual_grid"})
    calibration = gate_calibration(select["gate"], spec)
    strengths = [float(v) for v in args.strengths.split(",")]
    for size, strength, gated in itertools.product(sizes, strengths, (True, False)):
        mask = ranked_mask(full, size)
        mask.strength = strength
        if gated:
            mask = gate_mask(target.model, bottleneck, target.tokenizer, mask, control, calibration)
        for name, applied in (
            ("codeunlearn", mask),
            ("random_codes", random_mask_like(mask, np.random.default_rng(0))),
        ):
            if name == "random_codes" and (gated or strength != max(strengths)):
                continue  # one ungated random control per size, at the strongest strength
            apply_mask(bottleneck, applied)
            try:
                row = {"name": name, "size": size, "strength": strength, "gated": gated and name == "codeunlearn"}
                row.update(score())
            finally:
                unmask(bottleneck)
            rows.append(row)
            print(row, flush=True)
    result = {
        "profile": args.profile,
        "fit_s": fit_s,
        "final_fit": history[-1],
        "control_authors": select["control_authors"],
        "eval_size": args.eval_size,
        "rows": rows,
        "load_average_1m": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
