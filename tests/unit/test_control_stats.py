"""Cached control statistics: a request that reads the control's cached code ids selects and gates exactly
as one that forwards the control again, and statistics of another codebook or control are refused. Counting
with a shared prompt prefix run once gives the codes a whole forward pass gives."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from codeunlearn.data.records import QARecord, records_sha256
from codeunlearn.methods import get_method
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, CodebookSpec, attach_codebook, codebook_sha256
from codeunlearn.methods.codeunlearn.control_stats import (
    STATS_META,
    CountingSettings,
    StaleControlStatisticsError,
    compute_control_statistics,
    load_control_statistics,
    save_control_statistics,
)
from codeunlearn.methods.codeunlearn.counting import encode_for_counting, rank_codes, shared_prefix_length
from codeunlearn.methods.codeunlearn.gate import GateCalibration, calibrate_gate, calibrate_gate_from_statistics
from codeunlearn.methods.codeunlearn.select import SelectionSpec
from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SELECTION = SelectionSpec(
    num_codes_to_disable=6, alpha=1.0, smoothing=0.5, positions="all", batch_size=3, max_length=48, rounds=2
)
COUNTING = CountingSettings(SELECTION.batch_size, SELECTION.max_length, SELECTION.positions)
MODES = {
    "bottleneck": {"mode": "bottleneck", "use_layernorm": True},
    "residual": {"mode": "residual", "use_layernorm": False},
}


def codebook_model(tokenizer, mode: str, seed: int = 0):
    spec = TinyModelSpec(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_positions=128, vocab_size=300, seed=0
    )
    torch.manual_seed(0)
    model = build_tiny_llama(spec, tokenizer)
    torch.manual_seed(seed)
    bottleneck = CodebookBottleneck(32, CodebookSpec(num_codes=64, k=4, layer=0, **MODES[mode]))
    attach_codebook(model, bottleneck)
    return model, bottleneck


def method_params(statistics_dir=None, shared_prefix: bool = False) -> dict:
    params = {
        **asdict(SELECTION),
        "shared_prefix": shared_prefix,
        "control": "retain",
        "name_min_mentions": 5,
        "gate": {"enabled": True, "quantile": 0.9, "min_tokens": 2, "watch_codes": 3},
    }
    return params if statistics_dir is None else {**params, "statistics_dir": str(statistics_dir)}


def request(model, tokenizer, qa, params):
    return get_method("codeunlearn").unlearn(model, tokenizer, qa["forget"], qa["retain"], params)


def same_mask(first, second) -> None:
    a, b = first.artifacts["code_mask"], second.artifacts["code_mask"]
    assert a.disabled_ids == b.disabled_ids
    assert a.scores == b.scores
    assert a.gate == b.gate


@pytest.mark.parametrize("shared_prefix", [False, True])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_cached_and_recomputed_statistics_give_the_same_masks_bit_for_bit(
    mode, shared_prefix, tmp_path, tiny_tokenizer, tiny_qa
):
    recomputed_model, _ = codebook_model(tiny_tokenizer, mode)
    cached_model, _ = codebook_model(tiny_tokenizer, mode)
    # The first request computes and saves the statistics, the second (on top of the first's mask) reads them.
    states = []
    for _ in range(2):
        recomputed = request(recomputed_model, tiny_tokenizer, tiny_qa, method_params(shared_prefix=shared_prefix))
        cached = request(cached_model, tiny_tokenizer, tiny_qa, method_params(tmp_path, shared_prefix))
        same_mask(recomputed, cached)
        assert recomputed.artifacts["code_mask"].disabled_ids
        assert recomputed.stats["control_statistics"] == "off"
        states.append(cached.stats["control_statistics"])
    assert states == ["computed", "cached"]
    assert [p.name for p in tmp_path.iterdir()] == [records_sha256(tiny_qa["retain"])[:16]]


def test_cached_gate_threshold_equals_the_forward_pass_one(tiny_tokenizer, tiny_qa):
    model, bottleneck = codebook_model(tiny_tokenizer, "bottleneck")
    stats = compute_control_statistics(
        model,
        bottleneck,
        tiny_tokenizer,
        tiny_qa["retain"],
        depth=10,
        counting=COUNTING,
        codebook_sha256=codebook_sha256(bottleneck),
        control_sha256=records_sha256(tiny_qa["retain"]),
    )
    calibration = GateCalibration(0.5, 2, SELECTION.batch_size, SELECTION.max_length, 3)
    for watched in ([0, 1, 2], [5, 9], list(range(0, 64, 3))):
        forwarded = calibrate_gate(model, bottleneck, tiny_tokenizer, tiny_qa["retain"], watched, calibration)
        assert calibrate_gate_from_statistics(stats, watched, calibration) == forwarded


def test_statistics_of_another_codebook_or_control_are_refused_naming_both_hashes(tmp_path, tiny_tokenizer, tiny_qa):
    model, bottleneck = codebook_model(tiny_tokenizer, "bottleneck")
    control_sha = records_sha256(tiny_qa["retain"])
    codebook = codebook_sha256(bottleneck)
    stats = compute_control_statistics(
        model,
        bottleneck,
        tiny_tokenizer,
        tiny_qa["retain"],
        depth=8,
        counting=COUNTING,
        codebook_sha256=codebook,
        control_sha256=control_sha,
    )
    save_control_statistics(stats, tmp_path)
    loaded = load_control_statistics(tmp_path, codebook_sha256=codebook, control_sha256=control_sha, counting=COUNTING)
    assert torch.equal(loaded.ids, stats.ids) and torch.equal(loaded.lengths, stats.lengths)
    other = "0" * 64
    with pytest.raises(StaleControlStatisticsError) as refused:
        load_control_statistics(tmp_path, codebook_sha256=other, control_sha256=control_sha, counting=COUNTING)
    assert str(tmp_path / STATS_META) in str(refused.value)
    assert codebook in str(refused.value) and other in str(refused.value)
    with pytest.raises(StaleControlStatisticsError) as refused:
        load_control_statistics(tmp_path, codebook_sha256=codebook, control_sha256=other, counting=COUNTING)
    assert control_sha in str(refused.value) and other in str(refused.value)
    wider = CountingSettings(SELECTION.batch_size + 1, SELECTION.max_length, SELECTION.positions)
    with pytest.raises(StaleControlStatisticsError, match="counting"):
        load_control_statistics(tmp_path, codebook_sha256=codebook, control_sha256=control_sha, counting=wider)


def test_a_request_on_another_codebook_refuses_the_cached_statistics_and_recomputes(
    tmp_path, tiny_tokenizer, tiny_qa, caplog
):
    first_model, _ = codebook_model(tiny_tokenizer, "bottleneck", seed=0)
    request(first_model, tiny_tokenizer, tiny_qa, method_params(tmp_path))
    other_model, other_bottleneck = codebook_model(tiny_tokenizer, "bottleneck", seed=1)
    with caplog.at_level("WARNING"):
        cached = request(other_model, tiny_tokenizer, tiny_qa, method_params(tmp_path))
    assert cached.stats["control_statistics"] == "recomputed: stale"
    assert codebook_sha256(other_bottleneck) in caplog.text and "stale control statistics" in caplog.text
    fresh_model, _ = codebook_model(tiny_tokenizer, "bottleneck", seed=1)
    same_mask(request(fresh_model, tiny_tokenizer, tiny_qa, method_params()), cached)
    # The recomputed statistics replaced the stale ones: the next request on this codebook reads them.
    again_model, _ = codebook_model(tiny_tokenizer, "bottleneck", seed=1)
    assert request(again_model, tiny_tokenizer, tiny_qa, method_params(tmp_path)).stats["control_statistics"] == (
        "cached"
    )


def test_a_control_built_from_the_forget_set_is_never_cached(tmp_path, tiny_tokenizer, tiny_qa):
    model, _ = codebook_model(tiny_tokenizer, "bottleneck")
    records = {
        split: [QARecord(r.id, r.question, r.answer, r.subject) for r in rows] for split, rows in tiny_qa.items()
    }
    params = {**method_params(tmp_path), "control": "name_swap", "name_min_mentions": 1}
    result = request(model, tiny_tokenizer, records, params)
    assert result.stats["control_statistics"] == "off"
    assert not any(tmp_path.iterdir())


def test_the_shared_prefix_is_what_every_record_starts_with_leaving_each_a_token(tiny_tokenizer, tiny_qa):
    records = tiny_qa["forget"] + tiny_qa["retain"]
    encoded = encode_for_counting(tiny_tokenizer, records, SELECTION.max_length)
    length = shared_prefix_length(encoded)
    assert length >= 2  # BOS and the plain prompt frame's "Question:"
    assert len({tuple(e.input_ids[:length]) for e in encoded}) == 1
    assert len({e.input_ids[length] for e in encoded}) > 1
    one = encode_for_counting(tiny_tokenizer, records[:1], SELECTION.max_length)
    assert shared_prefix_length(one) == len(one[0].input_ids) - 1
    assert shared_prefix_length([]) == 0


@pytest.mark.parametrize("positions", ["all", "answer"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_counting_after_a_shared_prefix_ranks_the_codes_a_whole_forward_ranks(mode, positions, tiny_tokenizer, tiny_qa):
    model, bottleneck = codebook_model(tiny_tokenizer, mode)
    records = tiny_qa["forget"] + tiny_qa["retain"]
    counting = {"batch_size": SELECTION.batch_size, "max_length": SELECTION.max_length, "positions": positions}
    whole = rank_codes(model, bottleneck, tiny_tokenizer, records, depth=10, **counting)
    shared = rank_codes(model, bottleneck, tiny_tokenizer, records, depth=10, shared_prefix=True, **counting)
    k = bottleneck.spec.k
    assert shared.tokens == whole.tokens
    assert torch.equal(shared.ids[:, :k], whole.ids[:, :k])
    assert torch.equal(shared.counts().counts, whole.counts().counts)
