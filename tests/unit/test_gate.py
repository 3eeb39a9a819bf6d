"""The DSG-style gate on a code mask: hand-checked statistics, exact behaviour at its extremes,
cached generation equal to full recomputation, calibration and the mask artifact."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from codeunlearn.eval.sweep import frontier
from codeunlearn.lm.prompting import encode_qa, pad_batch
from codeunlearn.methods.codeunlearn.codebook import (
    CodebookBottleneck,
    CodebookSpec,
    GateSpec,
    attach_codebook,
    codebook_sha256,
    peak_fire_rate,
    running_gate,
)
from codeunlearn.methods.codeunlearn.gate import GateCalibration, calibrate_gate, watch_list
from codeunlearn.methods.codeunlearn.mask import CodeMask, apply_mask, load_mask, save_mask, unmask
from codeunlearn.methods.codeunlearn.select import SelectionSpec, select_mask

WATCH = (0, 5)  # watched codes, for tests where only the statistics matter
SELECTION = SelectionSpec(
    num_codes_to_disable=6, alpha=1.0, smoothing=0.5, positions="all", batch_size=8, max_length=48, rounds=2
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def gated_model(tiny_model, tiny_qa, tiny_tokenizer):
    """The tiny Llama through an untrained codebook, with six forget-enriched codes selected."""
    torch.manual_seed(0)
    bottleneck = CodebookBottleneck(tiny_model.config.hidden_size, CodebookSpec(num_codes=64, k=4, layer=0))
    attach_codebook(tiny_model, bottleneck)
    mask, _ = select_mask(tiny_model, bottleneck, tiny_tokenizer, tiny_qa["forget"], tiny_qa["retain"], SELECTION, {})
    assert len(mask.disabled_ids) == 6
    return tiny_model, bottleneck, mask


def test_running_gate_by_hand():
    fires = torch.tensor([[True, False, True, True]])
    valid = torch.ones_like(fires)
    # Running rates 1, 1/2, 2/3, 3/4: above 0.5 at tokens 0, 2 and 3; the gate stays open once open.
    is_open, carry = running_gate(fires, valid, GateSpec(threshold=0.5, min_tokens=1, watch_ids=WATCH))
    assert is_open.tolist() == [[True, True, True, True]]
    assert (carry.fired.item(), carry.seen.item(), carry.open.item()) == (3, 4, True)
    # Three tokens must be seen first: it trips at token 2 (rate 2/3 > 0.5), and a call decides as a
    # whole, so the tokens before the trip are masked too.
    is_open, _ = running_gate(fires, valid, GateSpec(threshold=0.5, min_tokens=3, watch_ids=WATCH))
    assert is_open.tolist() == [[True, True, True, True]]
    # From the second token on, rates never exceed 3/4.
    is_open, _ = running_gate(fires, valid, GateSpec(threshold=0.75, min_tokens=2, watch_ids=WATCH))
    assert not is_open.any()


def test_running_gate_skips_padding_and_continues_from_its_carry():
    fires = torch.tensor([[True, True, False, True, True], [False, True, True, False, False]])
    valid = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    gate = GateSpec(threshold=0.6, min_tokens=2, watch_ids=WATCH)
    whole, carry = running_gate(fires, valid, gate)
    # Row 0: the two padded fires do not count; real rates 0, 1/2, 2/3 -> trips at the last token.
    # Row 1: rates 0, 1/2, 2/3, 1/2, 2/5 -> trips at token 2.
    assert whole.tolist() == [[True] * 5, [True] * 5]
    assert carry.fired.tolist() == [2, 2] and carry.seen.tolist() == [3, 5]
    # Split in calls (prefill, then one token at a time): row 0 trips only in its last call; row 1 in
    # the first call, and stays open.
    first, carry = running_gate(fires[:, :3], valid[:, :3], gate)
    steps = [first]
    for t in (3, 4):
        step, carry = running_gate(fires[:, t : t + 1], valid[:, t : t + 1], gate, carry)
        steps.append(step)
    assert torch.cat(steps, dim=1).tolist() == [[False, False, False, False, True], [True] * 5]


def test_peak_fire_rate_by_hand():
    fires = torch.tensor([[True, False, False, True], [True, True, False, False]])
    valid = torch.tensor([[True, True, True, True], [False, True, True, True]])
    # Row 0: rates 1, 1/2, 1/3, 1/2; from the second token on the peak is 1/2.
    # Row 1: real rates 1, 1/2, 1/3; from the second real token on the peak is 1/2.
    assert peak_fire_rate(fires, valid, min_tokens=2).tolist() == [0.5, 0.5]
    assert peak_fire_rate(fires, valid, min_tokens=1).tolist() == [1.0, 1.0]


def gated_by(mask: CodeMask, threshold: float, min_tokens: int) -> CodeMask:
    """The mask behind a gate that watches all of its codes."""
    return replace(mask, gate=GateSpec(threshold=threshold, min_tokens=min_tokens, watch_ids=tuple(mask.disabled_ids)))


def _logits(model, tokenizer, records) -> torch.Tensor:
    batch = pad_batch([encode_qa(tokenizer, r.question, r.answer, 48) for r in records], tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_gate_extremes_are_exactly_unmasked_and_masked(gated_model, tiny_qa, tiny_tokenizer):
    model, bottleneck, mask = gated_model
    records = tiny_qa["forget"] + tiny_qa["retain"]
    unmasked = _logits(model, tiny_tokenizer, records)
    apply_mask(bottleneck, mask)
    masked = _logits(model, tiny_tokenizer, records)
    assert not torch.equal(masked, unmasked)
    # A rate never exceeds 1, so this gate never opens; a negative threshold opens at the first token.
    apply_mask(bottleneck, gated_by(mask, 1.0, 1))
    assert torch.equal(_logits(model, tiny_tokenizer, records), unmasked)
    apply_mask(bottleneck, gated_by(mask, -1.0, 1))
    assert torch.equal(_logits(model, tiny_tokenizer, records), masked)
    unmask(bottleneck)
    assert bottleneck.gate is None
    assert torch.equal(_logits(model, tiny_tokenizer, records), unmasked)


def test_a_prompt_that_trips_the_gate_is_answered_by_the_masked_model(gated_model, tiny_qa, tiny_tokenizer):
    model, bottleneck, mask = gated_model
    prompts = [tiny_qa["forget"][0].question, tiny_qa["retain"][1].question + " " + tiny_qa["retain"][1].answer]
    encoded = [tiny_tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    width = max(map(len, encoded))
    inputs = {
        "input_ids": torch.tensor([[tiny_tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded]),
        "attention_mask": torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded]),
    }

    def generate() -> tuple[torch.Tensor, torch.Tensor | None]:
        states: list[torch.Tensor] = []
        record = bottleneck.register_forward_hook(
            lambda module, _args, _out: states.append(module._gate_carry.open) if module._gate_carry else None
        )
        try:
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
        finally:
            record.remove()
        return out, torch.stack(states) if states else None

    unmasked, _ = generate()
    apply_mask(bottleneck, mask)
    masked, _ = generate()
    # The forget prompt trips this threshold during the prompt; the other sequence never does.
    apply_mask(bottleneck, gated_by(mask, 0.6, 2))
    gated, opened = generate()
    assert opened[:, 0].all() and not opened[:, 1].any()
    assert torch.equal(gated[0], masked[0]) and torch.equal(gated[1], unmasked[1])
    assert not torch.equal(masked[0], unmasked[0])


def test_calibration_at_quantile_one_spares_every_calibration_sequence(gated_model, tiny_qa, tiny_tokenizer):
    model, bottleneck, mask = gated_model
    retain = tiny_qa["retain"]
    unmasked = _logits(model, tiny_tokenizer, retain)
    calibration = GateCalibration(quantile=1.0, min_tokens=2, batch_size=8, max_length=48, watch_codes=6)
    gate = calibrate_gate(model, bottleneck, tiny_tokenizer, retain, mask.disabled_ids, calibration)
    assert 0.0 <= gate.threshold <= 1.0 and gate.min_tokens == 2
    assert gate == calibrate_gate(model, bottleneck, tiny_tokenizer, retain, mask.disabled_ids, calibration)
    apply_mask(bottleneck, replace(mask, gate=gate))
    # Each retain sequence's peak rate is at most the threshold, and the gate opens only above it.
    assert torch.equal(_logits(model, tiny_tokenizer, retain), unmasked)
    with pytest.raises(ValueError, match="calibration records"):
        calibrate_gate(model, bottleneck, tiny_tokenizer, [], mask.disabled_ids, calibration)


def test_watch_list_keeps_earlier_codes_then_the_top_ranked():
    calibration = GateCalibration(quantile=0.95, min_tokens=8, batch_size=8, max_length=48, watch_codes=3)
    assert watch_list([9, 4, 7, 1, 2], calibration) == [9, 4, 7]
    assert watch_list([9, 4, 7, 1, 2], calibration, earlier=[4, 30]) == [4, 30, 9, 7]


def test_gate_travels_with_the_mask_file(gated_model, tmp_path):
    _, bottleneck, mask = gated_model
    gated = replace(mask, gate=GateSpec(threshold=0.25, min_tokens=8, watch_ids=WATCH))
    save_mask(gated, tmp_path / "mask")
    loaded = load_mask(tmp_path / "mask")
    assert loaded.gate == GateSpec(threshold=0.25, min_tokens=8, watch_ids=WATCH)
    assert loaded.disabled_ids == mask.disabled_ids
    apply_mask(bottleneck, loaded)
    assert bottleneck.gate == loaded.gate
    # A later request's gate (calibrated with the earlier codes disabled) governs the union.
    later_gate = GateSpec(threshold=0.5, min_tokens=4, watch_ids=(63, 0))
    later = CodeMask([63], [1.0], codebook_sha256(bottleneck), 64, {}, later_gate)
    assert loaded.merged_with(later).gate == later.gate
    meta = json.loads((tmp_path / "mask" / "mask.json").read_text())
    meta["gate"] = {"threshold": 0.25}
    (tmp_path / "mask" / "mask.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"mask\.json: field 'gate'"):
        load_mask(tmp_path / "mask")


def test_frontier_gated_selection_calibrates_a_gate_per_size(gated_model, tiny_qa, tiny_tokenizer):
    model, bottleneck, _ = gated_model
    calls = []

    def score() -> dict[str, float]:
        calls.append((int(bottleneck.disabled.sum()), bottleneck.gate))
        return {"forget_rouge": 0.0, "retain_rouge": 0.0}

    rows = frontier(
        model,
        bottleneck,
        tiny_tokenizer,
        tiny_qa["forget"],
        tiny_qa["retain"],
        SELECTION,
        ["retain"],
        [2, 4],
        5,
        score,
        seed=0,
        selections=["iterative", "gated_iterative"],
        gate=GateCalibration(quantile=0.95, min_tokens=2, batch_size=8, max_length=48, watch_codes=3),
    )
    gated = [r for r in rows if r["selection"] == "gated_iterative"]
    assert [r["size"] for r in gated] == [2, 4]
    assert all(r["gate_threshold"] is not None for r in gated)
    assert all(r["gate_threshold"] is None for r in rows if r["selection"] != "gated_iterative")
    assert [gate is not None for _, gate in calls] == [False, False, False, True, True, False, False]
    assert bottleneck.gate is None and not bottleneck.disabled.any()
    with pytest.raises(ValueError, match="unknown"):
        frontier(model, bottleneck, tiny_tokenizer, [], [], SELECTION, ["retain"], [2], 5, score, 0, ["blended"])


def test_codeunlearn_method_gates_its_mask_and_extends_an_earlier_gate(gated_model, tiny_qa, tiny_tokenizer):
    from codeunlearn.methods import get_method

    model, bottleneck, _ = gated_model
    params = {
        **{name: getattr(SELECTION, name) for name in SelectionSpec.__dataclass_fields__},
        "num_codes_to_disable": 4,
        "control": "retain",
        "name_min_mentions": 5,
        "gate": {"enabled": True, "quantile": 0.95, "min_tokens": 2, "watch_codes": 2},
    }
    first = get_method("codeunlearn").unlearn(model, tiny_tokenizer, tiny_qa["forget"], tiny_qa["retain"], params)
    mask = first.artifacts["code_mask"]
    assert mask.gate is not None and mask.gate.watch_ids == tuple(mask.disabled_ids[:2])
    assert first.stats["gate_threshold"] == mask.gate.threshold
    assert bottleneck.gate == mask.gate
    # A second request on top: its gate watches the earlier request's codes, then its own top ones.
    second = get_method("codeunlearn").unlearn(model, tiny_tokenizer, tiny_qa["forget"], tiny_qa["retain"], params)
    later = second.artifacts["code_mask"]
    assert later.gate.watch_ids[:2] == mask.gate.watch_ids
    assert later.gate.watch_ids[2:] == tuple(later.disabled_ids[:2])
    assert mask.merged_with(later).gate == later.gate == bottleneck.gate
