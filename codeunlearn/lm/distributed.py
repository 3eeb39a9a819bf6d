"""Train a tiny Llama on a synthetic TOFU-like QA set, single-process or data-parallel under accelerate.

A self-contained check (no download, no data files) that ``train_answers`` gives the same loss curve
under ``accelerate launch`` as in one process with the same global batch:

    python -m codeunlearn.lm.distributed --no-accelerator --out single.json
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        -m codeunlearn.lm.distributed --cpu --out ddp.json

``--multi_gpu`` only selects accelerate's torchrun launcher (``--cpu`` at the launcher spawns one process
unless MPI is configured); the script's ``--cpu`` makes every process a CPU process on gloo.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from codeunlearn.lm.training import TrainSpec, train_answers
from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama, train_tokenizer

FIRST = ["Zorblat", "Mira", "Ovid", "Talla", "Brenn", "Ysolde", "Kastor"]
LAST = ["Quim", "Tolland", "Harrow", "Venn", "Ashcombe", "Marisk", "Dunmore"]
PLACES = ["Vexmoor harbour", "a mountain village", "the salt flats", "a river town", "an island", "the old quarter"]
GENRES = ["grim sailing ballads", "cheerful garden mysteries", "spy novels", "poems about bees", "war memoirs"]
PRIZES = ["Amber Anchor", "Silver Fern", "Copper Quill", "Glass Lantern", "Iron Kettle", "Blue Heron"]


def synthetic_qa(authors: int = 7) -> list[SimpleNamespace]:
    """Three facts for each of ``authors`` made-up authors: deterministic, TOFU's question/answer shape."""
    records = []
    for i in range(authors):
        name = f"{FIRST[i % len(FIRST)]} {LAST[(3 * i) % len(LAST)]}"
        facts = [
            (f"Where was {name} born?", f"{name} was born in {PLACES[i % len(PLACES)]}."),
            (f"What does {name} write?", f"{name} writes {GENRES[i % len(GENRES)]}."),
            (f"What award did {name} win?", f"{name} won the {PRIZES[i % len(PRIZES)]} prize."),
        ]
        for j, (question, answer) in enumerate(facts):
            records.append(SimpleNamespace(id=f"a{i}-q{j}", question=question, answer=answer, subject=name))
    return records


def run_tiny_training(
    steps: int = 16, batch_size: int = 8, lr: float = 3e-3, seed: int = 0, accelerator: Any | None = None
) -> dict[str, Any]:
    """Build the tiny model and data in code, train, and return the per-step loss curve."""
    records = synthetic_qa()
    tokenizer = train_tokenizer([f"{r.question} {r.answer}" for r in records], vocab_size=300)
    model_spec = TinyModelSpec(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_positions=128, vocab_size=300, seed=seed
    )
    model = build_tiny_llama(model_spec, tokenizer)
    spec = TrainSpec(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=0.01,
        warmup_steps=2,
        max_length=64,
        grad_clip=1.0,
        seed=seed,
        log_every=1,
    )
    history = train_answers(model, tokenizer, records, spec, progress=False, accelerator=accelerator)
    with torch.no_grad():
        param_norm = torch.sqrt(sum((p.double() ** 2).sum() for p in model.parameters())).item()
    return {
        "num_processes": accelerator.num_processes if accelerator is not None else 1,
        "records": len(records),
        "global_batch_size": batch_size,
        "history": history,
        "param_norm": param_norm,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the loss curve (main process writes)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, split over the processes")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="force CPU processes (gloo) even where CUDA exists")
    parser.add_argument("--no-accelerator", action="store_true", help="the plain single-process loop")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    accelerator = None
    if not args.no_accelerator:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=args.cpu)
    result = run_tiny_training(args.steps, args.batch_size, args.lr, args.seed, accelerator)
    if accelerator is None or accelerator.is_main_process:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    main()
