"""Does a general corpus in codebook training keep the codebook model's general answers?

The default codebook model answers world-fact and real-author questions with TOFU's fictitious authors
(model utility 0; its answer probabilities stay near the target's). This experiment asks the target for
trivia questions on broad topics (sampled), answers them with the target (greedy), mixes those
self-distillation pairs into the codebook's TOFU training set, trains a codebook exactly as the
``train_codebook`` stage does (same params, same seed), and scores the pipeline's evaluation suite:

    python -m bench.codebook_corpus --outputs data/outputs

It writes ``bench/results/<profile>/codebook_corpus.json`` (or ``--out``) whole, stamped with commit,
machine and load, and the codebook settings and arguments it ran with.

The model without the general pairs is the pipeline's own codebook model (``eval/metrics.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import GenerationConfig

from bench.run import RESULTS, stamp
from codeunlearn.data.records import QARecord
from codeunlearn.io import write_json
from codeunlearn.lm.generation import generate_answers
from codeunlearn.lm.prompting import encode_prompt, left_pad_prompts
from codeunlearn.methods.codeunlearn.train import CodebookLoss, Revival, train_codebook
from codeunlearn.metrics.scoring import score_model, summarize
from tasks.common import load_role
from tasks.context import make_context
from tasks.models import codebook_records, codebook_spec, train_spec

TOPICS = (
    "world geography",
    "capital cities",
    "world history",
    "famous scientists",
    "famous novels and their authors",
    "classic poetry",
    "the human body",
    "animals",
    "space and planets",
    "inventions",
    "music and composers",
    "painting and artists",
    "sports",
    "food and cooking",
    "languages",
    "mathematics",
)
ASK = "Write one short trivia question about {topic}. Reply with the question only."


def the_question(text: str) -> str | None:
    """The question in a sampled reply: its first line up to the first '?', after any quoting preamble
    ('One short trivia question about X is: "...?')."""
    line = text.strip().split("\n")[0]
    if "?" not in line:
        return None
    question = line[: line.index("?") + 1]
    if '"' in question:
        question = question.split('"')[-1]
    question = question.strip()
    return question if len(question) >= 12 else None


def sampled_questions(
    model, tokenizer, per_topic: int, max_new_tokens: int, temperature: float, seed: int
) -> list[str]:
    prompts = [encode_prompt(tokenizer, ASK.format(topic=topic)) for topic in TOPICS for _ in range(per_topic)]
    batch = left_pad_prompts(prompts, tokenizer.pad_token_id)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=0.95,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id],
    )
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config
        )
    replies = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    questions: list[str] = []
    for reply in replies:
        question = the_question(reply)
        if question and question not in questions:
            questions.append(question)
    return questions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outputs", type=Path, required=True, help="paths.outputs of a pipeline run (its target)")
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--per-topic", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--question-tokens", type=int, default=40)
    parser.add_argument("--steps", type=int, default=None, help="codebook steps (default: the profile's)")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<profile>/codebook_corpus.json")
    args = parser.parse_args()
    ctx = make_context(args.profile, args.params, overrides={"paths": {"outputs": str(args.outputs.resolve())}})
    evaluate = ctx.settings["evaluate"]
    target = load_role(ctx, "target")

    started = time.perf_counter()
    questions = sampled_questions(
        target.model, target.tokenizer, args.per_topic, args.question_tokens, args.temperature, ctx.settings["seed"]
    )
    answers = generate_answers(
        target.model, target.tokenizer, questions, evaluate["max_new_tokens"], evaluate["batch_size"]
    )
    general = [
        QARecord(id=f"general-{i}", question=q, answer=a)
        for i, (q, a) in enumerate(zip(questions, answers, strict=True))
    ]
    corpus_s = time.perf_counter() - started

    records = codebook_records(ctx)
    cfg = ctx.settings["codebook"]
    spec = codebook_spec(ctx)
    training = train_spec(ctx, "codebook_train")
    if args.steps:
        training = replace(training, steps=args.steps)
    started = time.perf_counter()
    _, history = train_codebook(
        target.model,
        target.tokenizer,
        [*records, *general],
        spec,
        training,
        CodebookLoss(cfg["reconstruction_weight"], cfg["l1_weight"]),
        Revival(cfg["revive_every"], cfg["revive_noise"]),
        cfg["init_batches"],
        progress=False,
        freeze_below=cfg["freeze_below"],
    )
    train_s = time.perf_counter() - started
    row = summarize(score_model(target.model, target.tokenizer, ctx.eval_sets(), ctx.eval_spec()), None)
    pipeline_row = json.loads((ctx.stage_dir("eval") / "metrics.json").read_text())["codebook"]
    keys = [k for k, v in row.items() if isinstance(v, float) and any(s in k for s in ("rouge", "prob", "utility"))]
    result = stamp(
        ctx,
        {
            "settings": {
                "codebook": ctx.settings["codebook"],
                "codebook_train": ctx.settings["codebook_train"],
                "arguments": {k: v for k, v in vars(args).items() if k not in ("outputs", "params", "out")},
            },
            "general_pairs": len(general),
            "tofu_pairs": len(records),
            "steps": training.steps,
            "corpus_s": corpus_s,
            "train_s": train_s,
            "final_step": history[-1],
            "with_general": {k: row[k] for k in keys},
            "pipeline_codebook": {k: pipeline_row.get(k) for k in keys},
        },
    )
    write_json(args.out or RESULTS / ctx.profile / "codebook_corpus.json", result)
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
