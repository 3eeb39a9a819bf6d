"""CodeUnlearn on the pipeline's target in either codebook mode: S' x strength x gate.

Trains the codebook exactly as the ``train_codebook`` stage does (same params, corpus and seed; ``--mode``
overrides ``codebook.mode``), selects against the control authors, and scores every grid point with
``request_scores``: forget ROUGE beside model utility (held-out retain authors, real authors, world
facts: ROUGE, Prob, truth ratio), each point in one decoding pass:

    python -m bench.codebook_grid --outputs data/outputs --mode residual \
        --out bench/results/default/codebook_grid_residual.json

A tuning aid for ``select.num_codes_to_disable`` / ``select.strength`` and the measurement that chose
``codebook.mode``; the pipeline's evaluation is the number of record. ``--out`` is written whole, stamped
with commit, machine and load (``bench.run.stamp``) and the settings and arguments it ran with.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from bench.run import stamp
from codeunlearn.data.records import read_jsonl_records
from codeunlearn.io import write_json
from codeunlearn.methods.codeunlearn.codebook import CODEBOOK_SPEC, attach_codebook, load_codebook, save_codebook
from codeunlearn.methods.codeunlearn.gate import gate_calibration, gate_mask
from codeunlearn.methods.codeunlearn.mask import apply_mask, random_mask_like, ranked_mask, unmask
from codeunlearn.methods.codeunlearn.select import SelectionSpec, select_mask
from codeunlearn.methods.codeunlearn.train import fit_codebook, text_chunks
from codeunlearn.metrics.scoring import request_scores, split_rouges
from codeunlearn.metrics.sets import evenly_spaced
from tasks.common import load_role
from tasks.context import make_context
from tasks.models import codebook_recipe, codebook_records, codebook_texts
from tasks.resume import fingerprint

CODEBOOK_FINGERPRINT = "fingerprint.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outputs", type=Path, required=True, help="paths.outputs of a pipeline run (its target)")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--mode", choices=["residual", "bottleneck"], default=None, help="codebook.mode override")
    parser.add_argument("--rouge-only", action="store_true", help="greedy ROUGE only (no Prob / truth ratio / MU)")
    parser.add_argument("--sizes", default="96,192,288")
    parser.add_argument("--gated", default="1,0", help="1: behind select.gate, 0: ungated")
    parser.add_argument("--strengths", default="1,2,4")
    parser.add_argument("--eval-size", type=int, default=20, help="QAs per scored set")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--codebook", type=Path, default=None, help="cache: load the codebook here, or save it")
    parser.add_argument("--random-every", action="store_true", help="a random control at every strength")
    parser.add_argument("--quantiles", default=None, help="gate quantiles to try (default: select.gate's)")
    args = parser.parse_args()
    overrides: dict = {"paths": {"outputs": str(args.outputs.resolve())}}
    if args.mode:
        overrides["codebook"] = {"mode": args.mode}
    sizes_of_sets = ("retain_eval_size", "real_authors_size", "world_facts_size")
    overrides["evaluate"] = dict.fromkeys(sizes_of_sets, args.eval_size)
    ctx = make_context(args.profile, None, overrides=overrides)
    settings = ctx.settings
    select = settings["select"]
    target = load_role(ctx, "target")
    corpus = settings["codebook"]["corpus"]
    general = text_chunks(target.tokenizer, codebook_texts(ctx), corpus["chunk_tokens"], corpus["chunks_per_text"])
    started = time.perf_counter()
    # The cached codebook counts only if the train_codebook stage's fingerprint (settings, data and the
    # code it runs) is the one it was saved under: older code's codebook is retrained, never reused.
    identity = fingerprint(ctx, "train_codebook")
    cached_identity = args.codebook / CODEBOOK_FINGERPRINT if args.codebook else None
    cached = bool(cached_identity and cached_identity.exists() and (args.codebook / CODEBOOK_SPEC).exists())
    if cached and json.loads(cached_identity.read_text()) == identity:
        bottleneck = load_codebook(args.codebook)
        attach_codebook(target.model, bottleneck)
        logged = [args.codebook / name for name in ("history.json", "training.json")]
        history = next((json.loads(path.read_text()) for path in logged if path.exists()), [])
        history = history["history"] if isinstance(history, dict) else history
    else:
        bottleneck, history = fit_codebook(
            target.model, target.tokenizer, codebook_records(ctx), general, codebook_recipe(ctx), progress=True
        )
        if args.codebook:
            save_codebook(bottleneck, args.codebook)
            (args.codebook / "history.json").write_text(json.dumps(history))
            write_json(args.codebook / CODEBOOK_FINGERPRINT, identity)
    fit_s = time.perf_counter() - started

    splits = ctx.stage_dir("splits")
    forget = read_jsonl_records(splits / "forget.jsonl")
    control, _ = ctx.retain_split()
    forget_eval = evenly_spaced(forget, args.eval_size)
    utility = ctx.utility_sets()  # the scored retain authors, world facts, real authors: --eval-size each
    spec_eval = ctx.eval_spec()
    keys = ("forget_rouge", "retain_rouge", "world_facts_rouge", "real_authors_rouge", "model_utility")

    def score() -> dict[str, float]:
        if args.rouge_only:
            sets = [forget_eval, utility.retain, utility.world_facts, utility.real_authors]
            values = split_rouges(target.model, target.tokenizer, sets, spec_eval.generation)
            return dict(zip(keys, values, strict=False))
        row = request_scores(target.model, target.tokenizer, forget_eval, utility, spec_eval)
        return {key: row[key] for key in keys}

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
    strengths = [float(v) for v in args.strengths.split(",")]
    quantiles = [float(v) for v in args.quantiles.split(",")] if args.quantiles else [select["gate"]["quantile"]]
    gates = [None if not int(v) else q for v in args.gated.split(",") for q in (quantiles if int(v) else [None])]
    for size, strength, quantile in itertools.product(sizes, strengths, gates):
        mask = ranked_mask(full, size)
        mask.strength = strength
        if quantile is not None:
            calibration = gate_calibration({**select["gate"], "quantile": quantile}, spec)
            mask = gate_mask(target.model, bottleneck, target.tokenizer, mask, control, calibration)
        masks = [("codeunlearn", mask)]
        if args.random_every or strength == max(strengths):  # the matched control: random codes, same gate
            masks.append(("random_codes", random_mask_like(mask, np.random.default_rng(settings["seed"]))))
        for name, applied in masks:
            apply_mask(bottleneck, applied)
            try:
                row = {"name": name, "size": size, "strength": strength, "gate_quantile": quantile}
                row.update(score())
            finally:
                unmask(bottleneck)
            rows.append(row)
            print(row, flush=True)
    result = stamp(
        ctx,
        {
            "mode": settings["codebook"]["mode"],
            "settings": {
                "codebook": settings["codebook"],
                "codebook_train": settings["codebook_train"],
                "select": select,
                "arguments": {k: v for k, v in vars(args).items() if k not in ("outputs", "params", "out", "codebook")},
            },
            "fit_s": fit_s,
            "final_fit": history[-1] if history else None,
            "control_authors": select["control_authors"],
            "eval_size": args.eval_size,
            "rows": rows,
        },
    )
    write_json(args.out, result)


if __name__ == "__main__":
    main()
