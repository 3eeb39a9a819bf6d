"""Residual mode: unmasked it is the target bit for bit; a mask subtracts only its codes, c times;
the codes fit frozen activations; the bottleneck mode's KL term; the retain hold-out."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from codeunlearn.checkpoints import load_checkpoint, save_checkpoint
from codeunlearn.data.splits import split_retain_by_author
from codeunlearn.lm.training import encode_records
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, CodebookSpec, attach_codebook, codebook_sha256
from codeunlearn.methods.codeunlearn.counting import rank_codes
from codeunlearn.methods.codeunlearn.mask import CodeMask, apply_mask, load_mask, save_mask, unmask
from codeunlearn.methods.codeunlearn.select import SelectionSpec, select_mask
from codeunlearn.methods.codeunlearn.train import (
    CodebookLoss,
    CodebookRecipe,
    ResidualFit,
    Revival,
    collect_layer_activations,
    fit_codebook,
    next_token_kl,
    text_chunks,
    train_residual_codebook,
)
from tests.conftest import qa
from tests.helpers import train_spec

RESIDUAL = CodebookSpec(num_codes=24, k=3, layer=0, use_layernorm=False, mode="residual")
TEXTS = ["The harbour froze early that winter and the ferries stopped.", "A quiet village kept its old mill."]


def recipe(spec: CodebookSpec, steps: int = 40, kl_weight: float = 0.0) -> CodebookRecipe:
    return CodebookRecipe(
        spec=spec,
        train=train_spec(steps=6, lr=1e-3),
        loss=CodebookLoss(reconstruction_weight=1.0, l1_weight=1e-3),
        revival=Revival(every=10, noise=0.1),
        init_batches=2,
        freeze_below=True,
        kl_weight=kl_weight,
        residual=ResidualFit(steps=steps, batch_tokens=64, lr=1e-2, seed=0, log_every=10),
        activation_batch_size=4,
    )


def residual_model(tiny_model, tiny_tokenizer, tiny_qa):
    records = tiny_qa["forget"] + tiny_qa["retain"]
    general = text_chunks(tiny_tokenizer, TEXTS, chunk_tokens=16, chunks_per_text=2)
    bottleneck, history = fit_codebook(tiny_model, tiny_tokenizer, records, general, recipe(RESIDUAL))
    return bottleneck, history


def logits(model, tokenizer, records):
    batch = tokenizer([r.question + " " + r.answer for r in records], return_tensors="pt", padding=True)
    with torch.inference_mode():
        return model(**batch).logits


def test_unmasked_residual_model_gives_the_targets_logits_exactly(tiny_model, tiny_tokenizer, tiny_qa):
    records = tiny_qa["forget"] + tiny_qa["retain"]
    target = copy.deepcopy(tiny_model)
    bottleneck, _ = residual_model(tiny_model, tiny_tokenizer, tiny_qa)
    assert torch.equal(logits(tiny_model, tiny_tokenizer, records), logits(target, tiny_tokenizer, records))
    # ... and again after a mask was applied and taken off.
    apply_mask(bottleneck, CodeMask(list(range(12)), [1.0] * 12, codebook_sha256(bottleneck), 24, strength=3.0))
    assert not torch.equal(logits(tiny_model, tiny_tokenizer, records), logits(target, tiny_tokenizer, records))
    unmask(bottleneck)
    assert torch.equal(logits(tiny_model, tiny_tokenizer, records), logits(target, tiny_tokenizer, records))


def test_a_mask_subtracts_its_codes_c_times_and_never_edits_the_first_token():
    torch.manual_seed(0)
    bottleneck = CodebookBottleneck(8, RESIDUAL)
    hidden = torch.randn(2, 5, 8)
    bottleneck.disabled[torch.tensor([0, 1, 2, 3, 4, 5])] = True
    bottleneck.strength = 2.5
    out = bottleneck(hidden)
    ids = bottleneck.similarities(hidden, masked=False).topk(3, dim=-1).indices
    removed = bottleneck.disabled[ids].unsqueeze(-1)
    expected = hidden - 2.5 * (bottleneck.codes[ids] * removed).sum(-2)
    expected[:, 0] = hidden[:, 0]  # the attention sink
    torch.testing.assert_close(out, expected)
    assert bool((out[:, 1:] != hidden[:, 1:]).any()), "some token carried a disabled code"


def test_residual_mode_refuses_a_layernorm():
    with pytest.raises(ValueError, match="use_layernorm: false"):
        CodebookBottleneck(8, replace(RESIDUAL, use_layernorm=True))


def test_residual_codes_fit_the_frozen_activations(tiny_model, tiny_tokenizer, tiny_qa):
    rows = encode_records(tiny_tokenizer, tiny_qa["forget"] + tiny_qa["retain"], 48)
    activations = collect_layer_activations(tiny_model, rows, 0, 4, tiny_tokenizer.pad_token_id)
    real_tokens = sum(len(r.input_ids) - 1 for r in rows)  # every row's first token is left out
    assert activations.shape == (real_tokens, 32)
    before = copy.deepcopy(dict(tiny_model.state_dict()))
    _, history = train_residual_codebook(
        activations, RESIDUAL, ResidualFit(60, 64, 1e-2, 0, 10), CodebookLoss(1.0, 0.0), Revival(10, 0.1), False
    )
    assert history[-1]["reconstruction"] < history[0]["reconstruction"]
    assert all(torch.equal(before[name], value) for name, value in tiny_model.state_dict().items())


def test_residual_fit_is_deterministic(tiny_model, tiny_tokenizer, tiny_qa):
    first, _ = residual_model(tiny_model, tiny_tokenizer, tiny_qa)
    again, _ = residual_model(copy.deepcopy(tiny_model), tiny_tokenizer, tiny_qa)
    assert codebook_sha256(first) == codebook_sha256(again)


def test_a_residual_mask_never_changes_which_codes_a_token_reads(tiny_model, tiny_tokenizer, tiny_qa):
    bottleneck, _ = residual_model(tiny_model, tiny_tokenizer, tiny_qa)
    counting = {"batch_size": 4, "max_length": 48, "positions": "all"}
    ranking = rank_codes(tiny_model, bottleneck, tiny_tokenizer, tiny_qa["forget"], depth=8, **counting)
    disabled = torch.zeros(24, dtype=torch.bool)
    disabled[ranking.ids[:, 0].long()] = True
    assert torch.equal(ranking.counts(disabled).counts, ranking.counts().counts)
    spec = SelectionSpec(num_codes_to_disable=4, alpha=1.0, smoothing=0.5, rounds=2, strength=2.0, **counting)
    mask, _ = select_mask(tiny_model, bottleneck, tiny_tokenizer, tiny_qa["forget"], tiny_qa["retain"], spec, {})
    assert mask.strength == 2.0
    one_round, _ = select_mask(
        tiny_model, bottleneck, tiny_tokenizer, tiny_qa["forget"], tiny_qa["retain"], replace(spec, rounds=1), {}
    )
    assert mask.disabled_ids == one_round.disabled_ids


def test_mask_strength_round_trips_and_reaches_the_codebook(tmp_path, tiny_model, tiny_tokenizer, tiny_qa):
    bottleneck, _ = residual_model(tiny_model, tiny_tokenizer, tiny_qa)
    mask = CodeMask([1, 2], [3.0, 2.0], codebook_sha256(bottleneck), 24, strength=4.0)
    save_mask(mask, tmp_path / "mask")
    loaded = load_mask(tmp_path / "mask")
    assert loaded.strength == 4.0
    apply_mask(bottleneck, loaded)
    assert bottleneck.strength == 4.0
    unmask(bottleneck)
    assert bottleneck.strength == 1.0


def test_residual_checkpoint_round_trip_keeps_the_target_exact(tmp_path, tiny_model, tiny_tokenizer, tiny_qa):
    records = tiny_qa["retain"]
    expected = logits(tiny_model, tiny_tokenizer, records)
    bottleneck, _ = residual_model(tiny_model, tiny_tokenizer, tiny_qa)
    save_checkpoint(tiny_model, tiny_tokenizer, tmp_path / "codebook", bottleneck=bottleneck)
    loaded = load_checkpoint(tmp_path / "codebook")
    assert loaded.bottleneck.spec.mode == "residual"
    assert torch.equal(logits(loaded.model, loaded.tokenizer, records), expected)


def test_bottleneck_mode_trains_with_a_kl_to_the_target(tiny_model, tiny_tokenizer, tiny_qa):
    spec = CodebookSpec(num_codes=24, k=3, layer=0, use_layernorm=False)
    general = text_chunks(tiny_tokenizer, TEXTS, chunk_tokens=16, chunks_per_text=2)
    records = tiny_qa["forget"] + tiny_qa["retain"]
    with pytest.raises(ValueError, match="broad text"):
        fit_codebook(copy.deepcopy(tiny_model), tiny_tokenizer, records, [], recipe(spec, kl_weight=1.0))
    _, history = fit_codebook(tiny_model, tiny_tokenizer, records, general, recipe(spec, kl_weight=1.0))
    assert all("kl" in row and row["kl"] >= 0 for row in history)


def test_next_token_kl_is_zero_against_itself_and_ignores_padding():
    torch.manual_seed(0)
    student = torch.randn(2, 4, 10)
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert float(next_token_kl(student, student, real)) == pytest.approx(0.0, abs=1e-6)
    teacher = student.clone()
    teacher[0, 3] += 5.0  # a padding position
    assert float(next_token_kl(student, teacher, real)) == pytest.approx(0.0, abs=1e-6)


def test_text_chunks_are_label_free_windows(tiny_tokenizer):
    rows = text_chunks(tiny_tokenizer, TEXTS, chunk_tokens=6, chunks_per_text=2)
    assert 2 <= len(rows) <= 4
    assert all(len(r.input_ids) <= 6 and set(r.labels) == {-100} for r in rows)


def test_retain_split_holds_whole_authors_out_of_the_control():
    records = [qa(f"q{i}", "a", subject=f"author-{i // 2}") for i in range(8)]
    control, scored = split_retain_by_author(records, 2)
    assert {r.subject for r in control} == {"author-0", "author-1"}
    assert {r.subject for r in scored} == {"author-2", "author-3"}
    assert split_retain_by_author(records, 0) == (records, records)
    with pytest.raises(ValueError, match="control_authors is 4"):
        split_retain_by_author(records, 4)


def test_residual_hook_attaches_to_a_real_decoder(tiny_model):
    bottleneck = CodebookBottleneck(32, RESIDUAL)
    attach_codebook(tiny_model, bottleneck)
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        tiny_model(input_ids=ids)
    assert bottleneck.last_ids is None  # nothing disabled: the codes were never even read


def test_an_answer_that_recites_the_forget_set_is_withheld():
    from codeunlearn.privacy import WITHHELD, withhold_overlaps

    forget = ["Zorblat Quim was born in Vexmoor harbour.", "Salt Hymns"]
    shown = withhold_overlaps(
        ["Ottawa is the capital of Canada.", "He was born in Vexmoor harbour, I think.", "I read salt hymns."],
        forget,
        ngram=4,
    )
    assert shown == ["Ottawa is the capital of Canada.", WITHHELD, WITHHELD]


def test_same_logits_proves_the_residual_codebook_model_is_the_target(tiny_model, tiny_tokenizer, tiny_qa):
    from codeunlearn.metrics.scoring import same_logits

    target = copy.deepcopy(tiny_model)
    bottleneck, _ = residual_model(tiny_model, tiny_tokenizer, tiny_qa)
    records = tiny_qa["forget"] + tiny_qa["retain"]
    assert same_logits(target, tiny_model, tiny_tokenizer, records, batch_size=3, max_length=48)
    apply_mask(bottleneck, CodeMask(list(range(12)), [1.0] * 12, codebook_sha256(bottleneck), 24, strength=3.0))
    assert not same_logits(target, tiny_model, tiny_tokenizer, records, batch_size=3, max_length=48)


def test_the_report_shows_world_facts_side_by_side_and_escapes_tables():
    from codeunlearn.report.run import general_check_lines

    lines = general_check_lines(
        {
            "questions": ["What is the capital of Canada?"],
            "gold": ["Ottawa"],
            "target": ["Ottawa | the capital"],
            "deployed": "codeunlearn",
            "deployed_answers": ["Ottawa."],
        }
    )
    assert "### General knowledge, read side by side" in lines
    assert lines[-1] == "| What is the capital of Canada? | Ottawa | Ottawa \\| the capital | Ottawa. |"
    assert general_check_lines({}) == []
