"""The codebook bottleneck: shapes, straight-through gradients, disabling, hooks, identity."""

from __future__ import annotations

import pytest
import torch

from codeunlearn.methods.codeunlearn.codebook import (
    CodebookBottleneck,
    CodebookSpec,
    attach_codebook,
    attached_codebook,
    codebook_sha256,
    load_codebook,
    save_codebook,
)
from tests.helpers import train_spec


def make_bottleneck(dim: int = 16, num_codes: int = 32, k: int = 4, layer: int = 0) -> CodebookBottleneck:
    torch.manual_seed(0)
    return CodebookBottleneck(dim, CodebookSpec(num_codes=num_codes, k=k, layer=layer))


def test_output_shape_and_ids():
    bottleneck = make_bottleneck()
    x = torch.randn(2, 5, 16)
    out = bottleneck(x)
    assert out.shape == x.shape
    assert bottleneck.last_ids.shape == (2, 5, 4)
    # k distinct codes per token
    assert all(len(set(row.tolist())) == 4 for row in bottleneck.last_ids.reshape(-1, 4))


def test_output_is_the_sum_of_the_selected_codes():
    bottleneck = make_bottleneck()
    out = bottleneck(torch.randn(1, 3, 16))
    expected = bottleneck.codes[bottleneck.last_ids].sum(-2)
    torch.testing.assert_close(out, expected)


def test_straight_through_gradient_reaches_input_and_codes():
    bottleneck = make_bottleneck()
    bottleneck.norm = torch.nn.Identity()  # isolate the snap from the LayerNorm's Jacobian
    x = torch.randn(1, 3, 16, requires_grad=True)
    upstream = torch.randn(1, 3, 16)
    (bottleneck(x) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream)  # identity gradient to the input
    chosen = bottleneck.last_ids.unique()
    assert bottleneck.codes.grad[chosen].abs().sum() > 0
    unchosen = torch.ones(32, dtype=torch.bool)
    unchosen[chosen] = False
    assert bottleneck.codes.grad[unchosen].abs().sum() == 0


def test_disabled_codes_are_never_selected_and_neighbours_fill_in():
    bottleneck = make_bottleneck()
    x = torch.randn(4, 6, 16)
    bottleneck(x)
    before = bottleneck.last_ids.clone()
    banned = before.reshape(-1).unique()[:10]
    bottleneck.disabled[banned] = True
    bottleneck(x)
    assert not torch.isin(bottleneck.last_ids, banned).any()
    assert bottleneck.last_ids.shape == before.shape  # still k codes per token


def test_hook_routes_the_residual_stream_and_detaches(tiny_model):
    ids = torch.tensor([[1, 5, 7, 9]])
    reference = tiny_model(ids).logits
    bottleneck = make_bottleneck(dim=32, layer=0)
    handle = attach_codebook(tiny_model, bottleneck)
    assert attached_codebook(tiny_model) is bottleneck
    with_codes = tiny_model(ids).logits
    assert bottleneck.last_ids is not None
    assert not torch.allclose(reference, with_codes)
    handle.remove()
    torch.testing.assert_close(tiny_model(ids).logits, reference)


def test_layer_out_of_range_is_refused(tiny_model):
    with pytest.raises(ValueError, match="out of range"):
        attach_codebook(tiny_model, make_bottleneck(dim=32, layer=7))


def test_sha256_ignores_the_mask_and_save_load_round_trips(tmp_path):
    bottleneck = make_bottleneck()
    sha = codebook_sha256(bottleneck)
    bottleneck.disabled[3] = True
    assert codebook_sha256(bottleneck) == sha
    save_codebook(bottleneck, tmp_path)
    loaded = load_codebook(tmp_path)
    assert codebook_sha256(loaded) == sha
    torch.testing.assert_close(loaded.codes, bottleneck.codes)
    with torch.no_grad():
        loaded.codes[0, 0] += 1.0
    assert codebook_sha256(loaded) != sha


def test_tampered_codebook_file_is_refused(tmp_path):
    save_codebook(make_bottleneck(), tmp_path)
    other = make_bottleneck()
    with torch.no_grad():
        other.codes.mul_(2)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "codebook.safetensors"))
    with pytest.raises(ValueError, match="do not match the sha256"):
        load_codebook(tmp_path)


def test_dead_codes_are_revived_from_activations():
    bottleneck = make_bottleneck()
    bottleneck.train()
    x = torch.randn(2, 8, 16)
    bottleneck(x)
    used = bottleneck.usage > 0
    before = bottleneck.codes.detach().clone()
    revived = bottleneck.revive_dead_codes(torch.Generator().manual_seed(0), noise=0.1)
    assert revived == int((~used).sum()) > 0
    assert torch.equal(bottleneck.codes[used], before[used])
    assert not torch.equal(bottleneck.codes[~used], before[~used])
    assert int(bottleneck.usage.sum()) == 0


def test_freeze_below_trains_only_the_blocks_above_the_codebook(tiny_model, tiny_tokenizer, tiny_qa):
    from codeunlearn.methods.codeunlearn.train import CodebookLoss, Revival, train_codebook

    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    spec = train_spec(steps=3, lr=1e-2)
    train_codebook(
        tiny_model,
        tiny_tokenizer,
        tiny_qa["forget"] + tiny_qa["retain"],
        CodebookSpec(num_codes=32, k=4, layer=0),
        spec,
        CodebookLoss(1.0, 1e-3),
        Revival(every=0, noise=0.0),
        init_batches=1,
        progress=False,
        freeze_below=True,
    )
    changed = {name for name, p in tiny_model.named_parameters() if not torch.equal(p, before[name])}
    assert not any(name.startswith(("model.embed_tokens", "model.layers.0.")) for name in changed)
    assert any(name.startswith("model.layers.1.") for name in changed)
    assert all(p.requires_grad for p in tiny_model.parameters())  # restored after training


def test_reconstruction_loss_is_relative_to_the_input_norm():
    bottleneck = CodebookBottleneck(4, CodebookSpec(num_codes=2, k=1, layer=0, use_layernorm=False))
    with torch.no_grad():
        bottleneck.codes.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    bottleneck.train()
    bottleneck(torch.tensor([[[100.0, 0, 0, 0]]]))  # nearest code (1,0,0,0): misses 99 of 100
    assert bottleneck.reconstruction_loss.item() == pytest.approx(0.99**2)
