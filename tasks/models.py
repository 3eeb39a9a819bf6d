"""Stages 3-5: the base model, the fine-tuned target and oracle (TOFU's protocol), and the codebook model."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from codeunlearn.checkpoints import save_checkpoint
from codeunlearn.data.forget_files import PassageRecord
from codeunlearn.data.muse import read_texts
from codeunlearn.data.records import read_jsonl_records, records_sha256
from codeunlearn.io import read_json, write_json
from codeunlearn.lm.training import TrainSpec, train_answers
from codeunlearn.methods.codeunlearn.codebook import CodebookSpec, codebook_sha256
from codeunlearn.methods.codeunlearn.counting import count_codes
from codeunlearn.methods.codeunlearn.train import (
    CodebookLoss,
    CodebookRecipe,
    ResidualFit,
    Revival,
    fit_codebook,
    text_chunks,
)
from codeunlearn.models.load import load_model
from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama, train_tokenizer
from tasks import tracking
from tasks.common import base_pointer, load_role, model_dir
from tasks.context import RunContext, torch_threads
from tasks.resume import resumable

TINY_SOURCE = "tiny"


def train_spec(ctx: RunContext, block: str) -> TrainSpec:
    return TrainSpec.from_block(ctx.settings[block], ctx.settings["seed"])


def data_tags(ctx: RunContext) -> dict[str, str]:
    summary = read_json(ctx.stage_dir("splits") / "summary.json")
    return {f"codeunlearn.data.{k}": str(v) for k, v in summary.items() if k.endswith("_sha256")}


@task(name="base_model", cache_policy=NONE)
@resumable("base_model")
def base_model(ctx: RunContext) -> dict:
    """Resolve the model source once; a tiny model is built in code, anything else is converted and cached."""
    source = ctx.settings["model"]["source"]
    pointer = base_pointer(ctx)
    if source == TINY_SOURCE:
        splits = ctx.stage_dir("splits")
        texts = [
            f"{r.question} {r.answer}"
            for name in ("forget", "retain")
            for r in read_jsonl_records(splits / f"{name}.jsonl")
        ]
        tiny = ctx.settings["model"]["tiny"]
        tokenizer = train_tokenizer(texts, tiny["vocab_size"])
        model = build_tiny_llama(TinyModelSpec(seed=ctx.settings["seed"], **tiny), tokenizer)
        checkpoint = model_dir(ctx, "base")
        save_checkpoint(model, tokenizer, checkpoint)
    else:
        model, tokenizer = load_model(source, ctx.cache_dir, device="cpu", dtype=ctx.settings["model"]["dtype"])
        checkpoint = ctx.cache_dir / "checkpoints" / source.replace(":", "_").replace("/", "_")
        if not (checkpoint / "config.json").exists():
            save_checkpoint(model, tokenizer, checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    info = {"source": source, "checkpoint": str(checkpoint), "parameters": n_params}
    write_json(pointer, info)
    with tracking.stage_run(ctx, "base_model"):
        tracking.log_flat_params({"model.source": source, "model.class": type(model).__name__})
        tracking.log_metrics({"model.parameters": n_params})
    return info


def finetune_threads(ctx: RunContext) -> int | None:
    """The torch threads of a fine-tune: ``side_by_side.threads`` whenever side by side is on, whether the
    flow runs target and oracle at once or DVC one after the other (same threads, same weights)."""
    side = ctx.settings["side_by_side"]
    return side["threads"] if side["enabled"] else None


def target_passages(ctx: RunContext) -> list[PassageRecord]:
    """Documents the target also learns (``finetune.passages``), as a copyright holder's text would have
    been in its training data: the first ``count`` texts of a MUSE-News file. The oracle never sees them."""
    cfg = ctx.settings["finetune"]["passages"]
    if not cfg["file"] or not cfg["count"]:
        return []
    path = ctx.resolve(ctx.settings["paths"]["muse_dir"]) / cfg["file"]
    texts = read_texts(path, cfg["count"])
    return [PassageRecord(f"{path.stem}-{index}", text) for index, text in enumerate(texts)]


def _finetune(ctx: RunContext, role: str, split_names: tuple[str, ...], extra: list | None = None) -> dict:
    splits = ctx.stage_dir("splits")
    records = [r for name in split_names for r in read_jsonl_records(splits / f"{name}.jsonl")] + list(extra or [])
    base = load_role(ctx, "base")
    spec = train_spec(ctx, "finetune")
    with tracking.stage_run(ctx, f"finetune_{role}"), torch_threads(finetune_threads(ctx)):
        history = train_answers(
            base.model, base.tokenizer, records, spec, progress=ctx.progress, description=f"finetune {role}"
        )
        save_checkpoint(base.model, base.tokenizer, model_dir(ctx, role))
        tracking.log_history(history, "train")
        summary = {"final_ce": history[-1]["ce"], "train_records": len(records), "steps": spec.steps}
        tracking.log_metrics(summary)
        tags = {**data_tags(ctx), "codeunlearn.train_sha256": records_sha256(records), "codeunlearn.role": role}
        version = tracking.register_model_dir(ctx, model_dir(ctx, role), role, tags)
    write_json(model_dir(ctx, role) / "training.json", {**summary, "history": history, "registered": version})
    return summary


@task(name="finetune_target", cache_policy=NONE)
@resumable("finetune_target")
def finetune_target(ctx: RunContext) -> dict:
    """The model that knows everything: forget + retain (and ``target_passages``)."""
    return _finetune(ctx, "target", ("forget", "retain"), target_passages(ctx))


@task(name="finetune_oracle", cache_policy=NONE)
@resumable("finetune_oracle")
def finetune_oracle(ctx: RunContext) -> dict:
    """The retain-only model: what the target would be had it never seen the forget set."""
    return _finetune(ctx, "oracle", ("retain",))


def codebook_records(ctx: RunContext) -> list:
    """The codebook's training set: the target's (forget + retain, and ``target_passages``)."""
    splits = ctx.stage_dir("splits")
    qas = [r for name in ("forget", "retain") for r in read_jsonl_records(splits / f"{name}.jsonl")]
    return qas + target_passages(ctx)


def codebook_texts(ctx: RunContext) -> list[str]:
    """Broad text for the codebook (``codebook.corpus``): articles the target never fine-tuned on."""
    corpus = ctx.settings["codebook"]["corpus"]
    if not corpus["news_file"]:
        return []
    texts = read_texts(ctx.resolve(ctx.settings["paths"]["muse_dir"]) / corpus["news_file"])
    return texts[: corpus["news_texts"]] if corpus["news_texts"] else texts


def codebook_spec(ctx: RunContext) -> CodebookSpec:
    cfg = ctx.settings["codebook"]
    return CodebookSpec(
        num_codes=cfg["num_codes"],
        k=cfg["k"],
        layer=cfg["layer"],
        use_layernorm=cfg["use_layernorm"],
        combine=cfg["combine"],
        mode=cfg["mode"],
    )


def codebook_recipe(ctx: RunContext) -> CodebookRecipe:
    cfg = ctx.settings["codebook"]
    residual = cfg["residual"]
    training = train_spec(ctx, "codebook_train")
    return CodebookRecipe(
        spec=codebook_spec(ctx),
        train=training,
        loss=CodebookLoss(cfg["reconstruction_weight"], cfg["l1_weight"]),
        revival=Revival(cfg["revive_every"], cfg["revive_noise"]),
        init_batches=cfg["init_batches"],
        freeze_below=cfg["freeze_below"],
        kl_weight=cfg["kl_weight"],
        residual=ResidualFit(
            steps=residual["steps"],
            batch_tokens=residual["batch_tokens"],
            lr=residual["lr"],
            seed=training.seed,
            log_every=training.log_every,
        ),
        activation_batch_size=residual["activation_batch_size"],
    )


@task(name="train_codebook", cache_policy=NONE)
@resumable("train_codebook")
def train_codebook_stage(ctx: RunContext) -> dict:
    records = codebook_records(ctx)
    target = load_role(ctx, "target")
    corpus = ctx.settings["codebook"]["corpus"]
    recipe = codebook_recipe(ctx)
    general = text_chunks(target.tokenizer, codebook_texts(ctx), corpus["chunk_tokens"], corpus["chunks_per_text"])
    with tracking.stage_run(ctx, "train_codebook"):
        bottleneck, history = fit_codebook(target.model, target.tokenizer, records, general, recipe, ctx.progress)
        out = model_dir(ctx, "codebook")
        save_checkpoint(target.model, target.tokenizer, out, bottleneck=bottleneck)
        tracking.log_history(history, "train")
        usage = count_codes(
            target.model,
            bottleneck,
            target.tokenizer,
            records,
            batch_size=ctx.settings["select"]["batch_size"],
            max_length=ctx.settings["select"]["max_length"],
            positions="all",
        )
        summary = {
            "mode": recipe.spec.mode,
            "final_reconstruction": history[-1]["reconstruction"],
            "live_codes": int((usage.counts > 0).sum()),
            "revived_total": history[-1]["revived_total"],
            "num_codes": recipe.spec.num_codes,
            "general_rows": len(general),
            **{f"final_{key}": history[-1][key] for key in ("ce", "kl") if key in history[-1]},
            **({"activations": int(history[-1]["activations"])} if "activations" in history[-1] else {}),
        }
        tracking.log_metrics({k: v for k, v in summary.items() if k != "mode"})
        sha = codebook_sha256(bottleneck)
        tags = {**data_tags(ctx), "codeunlearn.codebook_sha256": sha, "codeunlearn.role": "codebook"}
        version = tracking.register_model_dir(ctx, out, "codebook", tags)
    write_json(out / "training.json", {**summary, "codebook_sha256": sha, "history": history, "registered": version})
    return {**summary, "codebook_sha256": sha}
