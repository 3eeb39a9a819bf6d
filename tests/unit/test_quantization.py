"""Re-quantization: RTN pinned to hand-computed grids, torchao on a tiny Llama, hooks survive copying."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from codeunlearn.attacks.quantize import (
    QuantizationRecord,
    QuantizationSpec,
    fake_quantize_weight,
    quantize_rtn_,
    quantized_copy,
)
from codeunlearn.metrics.recovery import recovery

VOCAB = 100
N_LAYERS = 2
LINEARS_PER_LAYER = 7  # q, k, v, o, gate, up, down


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def test_rtn_8bit_by_hand():
    weight = torch.tensor([[1.27, -0.504, 0.3012, 0.0149, 2.54, 0.0, -0.0249, 1.0]])
    # Group 1: absmax 1.27 -> scale 1.27/127 = 0.01; q = 127, -50.4->-50, 30.12->30, 1.49->1.
    # Group 2: absmax 2.54 -> scale 0.02; q = 127, 0, -1.245->-1, 50.
    expected = torch.tensor([[1.27, -0.50, 0.30, 0.01, 2.54, 0.0, -0.02, 1.0]])
    assert torch.allclose(fake_quantize_weight(weight, bits=8, group_size=4), expected, atol=1e-6)


def test_rtn_4bit_asymmetric_and_ragged_by_hand():
    # 4-bit symmetric: absmax 0.7 -> scale 0.1; q = 7, -2.6->-3, 0.4->0, 3.3->3.
    weight = torch.tensor([[0.7, -0.26, 0.04, 0.33]])
    assert torch.allclose(
        fake_quantize_weight(weight, bits=4, group_size=4), torch.tensor([[0.7, -0.3, 0.0, 0.3]]), atol=1e-6
    )
    # 2-bit asymmetric: range [0, 3] -> scale 1, zero point 0; q = 0, 1.2->1, 3, 2.2->2.
    weight = torch.tensor([[0.0, 1.2, 3.0, 2.2]])
    assert torch.allclose(
        fake_quantize_weight(weight, bits=2, group_size=4, symmetric=False),
        torch.tensor([[0.0, 1.0, 3.0, 2.0]]),
    )
    # in_features 5 with groups of 4: the last column is a group of its own and is exact.
    weight = torch.tensor([[0.7, -0.26, 0.04, 0.33, -9.0]])
    out = fake_quantize_weight(weight, bits=4, group_size=4)
    assert torch.allclose(out, torch.tensor([[0.7, -0.3, 0.0, 0.3, -9.0]]), atol=1e-6)
    # An all-zero group stays zero (no division by a zero scale).
    assert torch.equal(fake_quantize_weight(torch.zeros(2, 4), 4, 2), torch.zeros(2, 4))


def test_rtn_in_place_skips_head_and_keeps_dtype(inputs):
    model = tiny_llama()
    head = model.lm_head.weight.detach().clone()
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    record = quantize_rtn_(model, bits=4, group_size=16)
    assert isinstance(record, QuantizationRecord)
    assert (record.quantizer, record.bits, record.group_size, record.symmetric) == ("rtn", 4, 16, True)
    assert record.n_layers == N_LAYERS * LINEARS_PER_LAYER
    assert torch.equal(model.lm_head.weight, head)
    after = model.model.layers[0].mlp.down_proj.weight
    assert after.dtype == before.dtype and not torch.equal(after, before)
    # At most 15 distinct levels per group of 16 input columns.
    assert all(len(torch.unique(group)) <= 15 for group in after.reshape(-1, 16))
    assert torch.isfinite(model(inputs).logits).all()


def test_4bit_loses_more_than_8bit(inputs):
    model = tiny_llama()
    reference = model(inputs).logits
    q8, r8 = quantized_copy(model, QuantizationSpec("rtn", bits=8, group_size=16))
    q4, r4 = quantized_copy(model, QuantizationSpec("rtn", bits=4, group_size=16))
    assert 0 < r8.mean_relative_error < r4.mean_relative_error
    assert (q8(inputs).logits - reference).abs().max() < (q4(inputs).logits - reference).abs().max()
    assert torch.equal(model(inputs).logits, reference), "the original must be untouched"


def test_quantized_copy_keeps_forward_hooks(inputs):
    model = tiny_llama()
    # A hook closing over a module outside the model, as codebook.attach_codebook does.
    outside = nn.Linear(32, 32, bias=False)
    nn.init.eye_(outside.weight)
    outside.weight.data.mul_(0.5)
    calls = []

    def hook(_module, _args, output):
        calls.append(1)
        return (outside(output[0]), *output[1:]) if isinstance(output, tuple) else outside(output)

    model.model.layers[0].register_forward_hook(hook)
    hooked = model(inputs).logits
    copy8, record = quantized_copy(model, QuantizationSpec("rtn", bits=8, group_size=16))
    assert record.n_layers == N_LAYERS * LINEARS_PER_LAYER  # the outside module is not part of the model
    calls.clear()
    out = copy8(inputs).logits
    assert calls, "the copy lost its forward hook"
    assert torch.equal(outside.weight, 0.5 * torch.eye(32)), "the hook's module must not be quantized"
    assert torch.allclose(out, hooked, atol=0.05)
    # Removing the hook from the original changes the original, not the copy.
    model.model.layers[0]._forward_hooks.clear()
    assert not torch.allclose(model(inputs).logits, hooked, atol=1e-3)
    assert torch.allclose(copy8(inputs).logits, out)


def test_torchao_runs_on_a_tiny_llama(inputs):
    model = tiny_llama()
    reference = model(inputs).logits
    q4, r4 = quantized_copy(model, QuantizationSpec("torchao", bits=4, group_size=16))
    q8, r8 = quantized_copy(model, QuantizationSpec("torchao", bits=8, group_size=16))
    assert (r4.quantizer, r4.n_layers) == ("torchao", N_LAYERS * LINEARS_PER_LAYER)
    assert 0 < r8.mean_relative_error < r4.mean_relative_error
    out4 = q4(inputs).logits
    assert torch.isfinite(out4).all() and not torch.equal(out4, reference)
    assert (q8(inputs).logits - reference).abs().max() < (out4 - reference).abs().max()
    generated = q4.generate(
        inputs[:1],
        attention_mask=torch.ones_like(inputs[:1]),
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
    )
    assert generated.shape == (1, inputs.shape[1] + 3)
    # Same grid family as RTN: 4-bit errors of the two quantizers are of the same order.
    _, rtn4 = quantized_copy(model, QuantizationSpec("rtn", bits=4, group_size=16))
    assert 0.5 < r4.mean_relative_error / rtn4.mean_relative_error < 2.0


def test_torchao_rejects_ragged_groups():
    with pytest.raises(ValueError, match="divisible by group_size"):
        quantized_copy(tiny_llama(), QuantizationSpec("torchao", bits=4, group_size=24))


def test_spec_validation_and_recovery():
    with pytest.raises(ValueError, match="quantizer"):
        QuantizationSpec("gptq", 4, 128)
    with pytest.raises(ValueError, match="bits"):
        QuantizationSpec("rtn", 16, 128)
    with pytest.raises(ValueError, match="group_size"):
        QuantizationSpec("rtn", 4, 0)
    assert recovery(0.83, 0.21) == pytest.approx(0.62)
    assert recovery(0.2, 0.2) == 0.0
