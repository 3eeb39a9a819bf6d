"""Code selection (chi-squared enrichment), the mask artifact, reversibility and determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, CodebookSpec, codebook_sha256
from codeunlearn.methods.codeunlearn.counting import CodeCounts
from codeunlearn.methods.codeunlearn.mask import (
    CodeMask,
    MaskMismatchError,
    apply_mask,
    load_mask,
    random_mask_like,
    save_mask,
    unmask,
)
from codeunlearn.methods.codeunlearn.select import SelectionSpec, chi2_enrichment, rank_enriched_codes, select_mask
from codeunlearn.methods.codeunlearn.train import CodebookLoss, Revival, train_codebook
from tests.helpers import train_spec


def counts(values: list[int], tokens: int, k: int = 1) -> CodeCounts:
    return CodeCounts(counts=torch.tensor(values), tokens=tokens, k=k)


def test_chi2_matches_scipy_contingency():
    forget = counts([30, 5, 10, 55], tokens=100)
    control = counts([10, 40, 10, 140], tokens=200)
    enrichment = chi2_enrichment(forget, control, smoothing=0.5)
    for code in range(4):
        table = [[forget.counts[code], 100 - forget.counts[code]], [control.counts[code], 200 - control.counts[code]]]
        expected, p_value, _, _ = chi2_contingency(np.array(table, dtype=float), correction=False)
        assert enrichment.chi2[code] == pytest.approx(expected)
        assert enrichment.p_value[code] == pytest.approx(p_value)


def test_planted_enriched_code_is_found_first_and_depleted_codes_never():
    rng = np.random.default_rng(0)
    control_counts = rng.multinomial(5000, np.full(50, 1 / 50))
    forget_probs = np.full(50, 1 / 50)
    forget_probs[17] = 0.30  # the planted code fires on the forget set
    forget_probs[3] = 0.0  # a code the forget set never uses
    forget_probs /= forget_probs.sum()
    forget_counts = rng.multinomial(1000, forget_probs)
    enrichment = chi2_enrichment(counts(forget_counts.tolist(), 1000), counts(control_counts.tolist(), 5000), 0.5)
    ranked = rank_enriched_codes(enrichment, alpha=0.05)
    assert ranked[0] == 17
    assert 3 not in ranked  # significant, but depleted: must not be disabled
    protected = np.zeros(50, dtype=bool)
    protected[17] = True
    assert 17 not in rank_enriched_codes(enrichment, alpha=0.05, protected=protected)


def make_mask(sha: str = "a" * 64, ids: list[int] | None = None) -> CodeMask:
    ids = ids if ids is not None else [4, 1, 9]
    return CodeMask(ids, [3.0, 2.0, 1.0][: len(ids)], sha, 16, {"forget_sha256": "f" * 64})


def test_mask_round_trips_through_safetensors_and_json(tmp_path):
    mask = make_mask()
    save_mask(mask, tmp_path)
    assert (tmp_path / "mask.safetensors").exists() and (tmp_path / "mask.json").exists()
    assert load_mask(tmp_path) == mask


def test_missing_mask_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mask.safetensors"):
        load_mask(tmp_path)


def test_mask_for_another_codebook_is_refused():
    torch.manual_seed(0)
    bottleneck = CodebookBottleneck(8, CodebookSpec(num_codes=16, k=2, layer=0))
    with pytest.raises(MaskMismatchError, match="codebook_sha256"):
        apply_mask(bottleneck, make_mask(sha="b" * 64), source="mask.json")
    assert not bottleneck.disabled.any()  # nothing applied


def test_sequential_masks_accumulate():
    first = make_mask(ids=[4, 1])
    second = CodeMask([1, 7], [5.0, 4.0], first.codebook_sha256, 16, {"forget_sha256": "e" * 64})
    merged = first.merged_with(second)
    assert merged.disabled_ids == [4, 1, 7]
    assert len(merged.provenance["requests"]) == 2


def test_random_control_is_matched_and_disjoint():
    mask = make_mask()
    control = random_mask_like(mask, np.random.default_rng(0))
    assert len(control.disabled_ids) == len(mask.disabled_ids)
    assert not set(control.disabled_ids) & set(mask.disabled_ids)


def codebook_model(tiny_model, tiny_tokenizer, tiny_qa, seed: int):
    records = tiny_qa["forget"] + tiny_qa["retain"]
    spec = train_spec(steps=30, lr=3e-3, warmup_steps=2, seed=seed, log_every=10)
    bottleneck, history = train_codebook(
        tiny_model,
        tiny_tokenizer,
        records,
        CodebookSpec(num_codes=64, k=4, layer=0),
        spec,
        CodebookLoss(1.0, 1e-3),
        Revival(every=10, noise=0.1),
        init_batches=2,
        progress=False,
    )
    return bottleneck, history


SELECTION = SelectionSpec(
    num_codes_to_disable=5, alpha=0.5, smoothing=0.5, positions="all", batch_size=4, max_length=48
)


def test_same_seed_gives_the_same_mask(tiny_tokenizer, tiny_qa):
    from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama

    masks = []
    for _ in range(2):
        spec = TinyModelSpec(32, 64, 2, 2, 128, 300, seed=0)
        model = build_tiny_llama(spec, tiny_tokenizer)
        bottleneck, history = codebook_model(model, tiny_tokenizer, tiny_qa, seed=0)
        mask, _ = select_mask(model, bottleneck, tiny_tokenizer, tiny_qa["forget"], tiny_qa["retain"], SELECTION, {})
        masks.append((mask, history[-1]["loss"]))
    assert masks[0][0].disabled_ids == masks[1][0].disabled_ids
    assert masks[0][0].scores == masks[1][0].scores
    assert masks[0][1] == masks[1][1]
    assert masks[0][0].disabled_ids  # something was selected


def test_unmask_restores_outputs_bit_identically(tiny_model, tiny_tokenizer, tiny_qa):
    bottleneck, _ = codebook_model(tiny_model, tiny_tokenizer, tiny_qa, seed=0)
    ids = torch.tensor([tiny_tokenizer("Where was Zorblat Quim born?")["input_ids"]])
    with torch.inference_mode():
        before = tiny_model(ids).logits.clone()
    used = bottleneck.last_ids.reshape(-1).unique()[:5].tolist()
    mask = CodeMask(used, [1.0] * len(used), codebook_sha256(bottleneck), bottleneck.spec.num_codes)
    apply_mask(bottleneck, mask)
    with torch.inference_mode():
        masked = tiny_model(ids).logits.clone()
    unmask(bottleneck)
    with torch.inference_mode():
        after = tiny_model(ids).logits
    assert not torch.equal(before, masked)
    assert torch.equal(before, after)


def test_hook_survives_checkpoint_round_trip(tmp_path, tiny_model, tiny_tokenizer, tiny_qa):
    from codeunlearn.checkpoints import load_checkpoint, save_checkpoint

    bottleneck, _ = codebook_model(tiny_model, tiny_tokenizer, tiny_qa, seed=0)
    save_checkpoint(tiny_model, tiny_tokenizer, tmp_path / "ckpt", bottleneck=bottleneck)
    loaded = load_checkpoint(tmp_path / "ckpt")
    ids = torch.tensor([[1, 5, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(ids).logits, tiny_model(ids).logits)
    assert loaded.bottleneck is not None


@pytest.mark.parametrize("positions", ["all", "answer"])
def test_counting_stops_at_the_codebook_with_the_counts_of_a_full_forward(
    tiny_model, tiny_tokenizer, tiny_qa, positions
):
    from codeunlearn.methods.codeunlearn.counting import count_codes

    bottleneck, _ = codebook_model(tiny_model, tiny_tokenizer, tiny_qa, seed=0)
    records = tiny_qa["forget"] + tiny_qa["retain"]
    counting = {"batch_size": 3, "max_length": 48, "positions": positions}
    for disabled in ([], [0, 7, 21]):
        bottleneck.disabled.zero_()
        bottleneck.disabled[torch.tensor(disabled, dtype=torch.long)] = True
        early = count_codes(tiny_model, bottleneck, tiny_tokenizer, records, **counting)
        full = count_codes(tiny_model, bottleneck, tiny_tokenizer, records, stop_early=False, **counting)
        assert torch.equal(early.counts, full.counts)
        assert early.tokens == full.tokens > 0 and early.k == full.k
    unmask(bottleneck)


def test_one_ranking_gives_the_counts_of_a_forward_under_any_larger_mask(
    tiny_model, tiny_tokenizer, tiny_qa, monkeypatch
):
    from codeunlearn.methods.codeunlearn import counting as code_counting
    from codeunlearn.methods.codeunlearn.counting import count_codes, rank_codes

    monkeypatch.setattr(code_counting, "_RANKING_CHUNK", 7)  # several chunks, the last one partial

    bottleneck, _ = codebook_model(tiny_model, tiny_tokenizer, tiny_qa, seed=0)
    records = tiny_qa["forget"] + tiny_qa["retain"]
    counting = {"batch_size": 4, "max_length": 48, "positions": "all"}
    bottleneck.disabled[3] = True  # the mask the ranking is taken under (an earlier request's)
    ranking = rank_codes(tiny_model, bottleneck, tiny_tokenizer, records, depth=bottleneck.spec.k + 12, **counting)
    used = ranking.counts(bottleneck.disabled).counts.argsort(descending=True, stable=True)
    for extra in ([], used[:4].tolist(), used[:12].tolist()):
        bottleneck.disabled[torch.tensor(extra, dtype=torch.long)] = True
        full = count_codes(tiny_model, bottleneck, tiny_tokenizer, records, stop_early=False, **counting)
        assert torch.equal(ranking.counts(bottleneck.disabled).counts, full.counts)
    bottleneck.disabled[ranking.ids[0, :13].long()] = True  # one more than the first token's ranking allows
    with pytest.raises(ValueError, match="fewer than k"):
        ranking.counts(bottleneck.disabled)
    unmask(bottleneck)


def test_selection_leaves_the_mask_it_found(tiny_model, tiny_tokenizer, tiny_qa):
    bottleneck, _ = codebook_model(tiny_model, tiny_tokenizer, tiny_qa, seed=0)
    bottleneck.disabled[torch.tensor([2, 5])] = True
    spec = SelectionSpec(**{**SELECTION.__dict__, "rounds": 3, "num_codes_to_disable": 6})
    mask, _ = select_mask(tiny_model, bottleneck, tiny_tokenizer, tiny_qa["forget"], tiny_qa["retain"], spec, {})
    assert bottleneck.disabled.nonzero().flatten().tolist() == [2, 5]
    assert mask.disabled_ids and not {2, 5} & set(mask.disabled_ids)
    assert len(set(mask.disabled_ids)) == len(mask.disabled_ids)
