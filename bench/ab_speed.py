"""Same machine, same model, same sets: the TOFU scoring of one model and a few training steps, timed
with whichever `codeunlearn` / `tasks` are first on sys.path. Run it once from each of two checkouts to
A/B them. The evaluation sets are the pipeline's own (``RunContext.eval_sets``) under ``--outputs``;
the sizes, budgets and training batch come from one params file and profile (``--params``,
``--profile``); the generation batch can be overridden, since changing it may be what is compared:

    python -m bench.ab_speed --outputs data/outputs --role target --out /tmp/ab_new.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import codeunlearn
from codeunlearn.lm.training import TrainSpec, train_answers
from codeunlearn.metrics.scoring import score_model
from codeunlearn.metrics.sets import EvalSpec
from tasks.common import load_role
from tasks.context import make_context


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outputs", type=Path, required=True, help="paths.outputs of the run whose model is timed")
    parser.add_argument("--role", default="target", help="the stage model to time (target, oracle, codebook)")
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--batch-size", type=int, default=None, help="generation batch (default: the profile's)")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ctx = make_context(args.profile, args.params, overrides={"paths": {"outputs": str(args.outputs.resolve())}})
    evaluate, finetune = ctx.settings["evaluate"], ctx.settings["finetune"]
    checkpoint = load_role(ctx, args.role)
    sets = ctx.eval_sets()
    spec = EvalSpec(
        max_new_tokens=evaluate["max_new_tokens"],
        batch_size=args.batch_size or evaluate["batch_size"],
        score_batch_size=evaluate["score_batch_size"],
        max_length=evaluate["max_length"],
    )
    started = time.perf_counter()
    scores = score_model(checkpoint.model, checkpoint.tokenizer, sets, spec)
    score_s = time.perf_counter() - started
    # The fine-tune's own batch and length; warm-up off so every timed step is a full one.
    train = TrainSpec.from_block(finetune, 0, steps=args.train_steps, warmup_steps=0, log_every=1)
    started = time.perf_counter()
    train_answers(checkpoint.model, checkpoint.tokenizer, [*sets.forget, *sets.retain], train, progress=False)
    train_s = time.perf_counter() - started
    result = {
        "score_model_s": score_s,
        "train_step_s": train_s / args.train_steps,
        "forget_rouge": scores.splits["forget"]["rouge"],
        "retain_rouge": scores.splits["retain"]["rouge"],
        "codeunlearn": str(Path(codeunlearn.__file__).parent),
        "load_average_1m": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(result)


if __name__ == "__main__":
    main()
