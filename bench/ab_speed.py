"""Same machine, same model, same sets: the TOFU scoring of one model and a few training steps, timed
with whichever `codeunlearn` is first on sys.path. Run it once from each of two checkouts to A/B them:

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
from codeunlearn.data import load_tofu_file, read_jsonl_records
from codeunlearn.evaluation import EvalSets, EvalSpec, evenly_spaced, has_truth_ratio_data, score_model
from codeunlearn.training import TrainSpec, train_answers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--tofu-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, required=True, help="generation batch")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    checkpoint = load_checkpoint(args.checkpoint, torch.device("cpu"))
    forget = [r for r in read_jsonl_records(args.splits / "forget.jsonl") if has_truth_ratio_data(r, "forget")]
    retain = [r for r in read_jsonl_records(args.splits / "retain.jsonl") if has_truth_ratio_data(r, "retain")]
    sets = EvalSets(
        forget=forget,
        retain=evenly_spaced(retain, 20),
        real_authors=evenly_spaced(load_tofu_file(args.tofu_dir / "real_authors_perturbed.json"), 20),
        world_facts=evenly_spaced(load_tofu_file(args.tofu_dir / "world_facts_perturbed.json"), 20),
        holdout=read_jsonl_records(args.splits / "holdout.jsonl"),
    )
    spec = EvalSpec(max_new_tokens=64, batch_size=args.batch_size, score_batch_size=16, max_length=128)
    started = time.perf_counter()
    scores = score_model(checkpoint.model, checkpoint.tokenizer, sets, spec)
    score_s = time.perf_counter() - started
    train = TrainSpec(
        steps=args.train_steps,
        batch_size=8,
        lr=1e-5,
        weight_decay=0.0,
        warmup_steps=0,
        max_length=128,
        grad_clip=1.0,
        seed=0,
        log_every=1,
    )
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
