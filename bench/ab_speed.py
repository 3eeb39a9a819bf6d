"""Same machine, same model, same sets: the TOFU scoring of one model and a few training steps, timed
with whichever `codeunlearn` is first on sys.path. Run it once from each of two checkouts to A/B them.
The eval sizes, token budgets and training batch come from one params file and profile (``--params``,
``--profile``; the generation batch can be overridden, since changing it may be what is compared):

    python -m bench.ab_speed --checkpoint data/outputs/default/models/target --splits data/outputs/default/splits \
        --tofu-dir ../shared/data/tofu --batch-size 80 --out bench/results/default/ab_new.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import codeunlearn
from codeunlearn.checkpoints import load_checkpoint
from codeunlearn.config import load_settings
from codeunlearn.data import load_tofu_file, read_jsonl_records
from codeunlearn.evaluation import EvalSets, EvalSpec, evenly_spaced, has_truth_ratio_data, score_model
from codeunlearn.training import TrainSpec, train_answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--tofu-dir", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--batch-size", type=int, default=None, help="generation batch (default: the profile's)")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    settings = load_settings(args.params, args.profile)
    evaluate, finetune = settings["evaluate"], settings["finetune"]
    torch.set_num_threads(settings["threads"])
    checkpoint = load_checkpoint(args.checkpoint, torch.device("cpu"))
    forget = [r for r in read_jsonl_records(args.splits / "forget.jsonl") if has_truth_ratio_data(r, "forget")]
    retain = [r for r in read_jsonl_records(args.splits / "retain.jsonl") if has_truth_ratio_data(r, "retain")]
    sets = EvalSets(
        forget=forget,
        retain=evenly_spaced(retain, evaluate["retain_eval_size"]),
        real_authors=evenly_spaced(
            load_tofu_file(args.tofu_dir / "real_authors_perturbed.json"), evaluate["real_authors_size"]
        ),
        world_facts=evenly_spaced(
            load_tofu_file(args.tofu_dir / "world_facts_perturbed.json"), evaluate["world_facts_size"]
        ),
        holdout=read_jsonl_records(args.splits / "holdout.jsonl"),
    )
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
    train = TrainSpec(**{**finetune, "steps": args.train_steps, "warmup_steps": 0, "log_every": 1}, seed=0)
    started = time.perf_counter()
    train_answers(checkpoint.model, checkpoint.tokenizer, forget + retain, train, progress=False)
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
