"""Which codes fire on a set of records: per-token code counts, and every token's ranking of codes.

Counting stops the forward pass at the codebook: the code ids at block L never depend on later blocks,
so the blocks above and the LM head never run. The first token never counts (the attention sink).

With ``shared_prefix`` the tokens every record starts with (a chat template's system prompt: 24 of
SmolLM2's ~86 tokens a TOFU QA) run once, and each batch continues from their key/value cache: the
same attention over the same keys, a quarter fewer tokens through the blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from codeunlearn.lm.blocks import StopForward
from codeunlearn.lm.prompting import IGNORE_INDEX, encode_qas, pad_batch
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck


@dataclass(frozen=True)
class CodeCounts:
    counts: torch.Tensor  # [num_codes] how many selected (token, slot) pairs used each code
    tokens: int  # number of tokens counted
    k: int

    @property
    def slots(self) -> int:
        return self.tokens * self.k


@dataclass(frozen=True)
class CodeRanking:
    """Every counted token's ``depth`` most similar codes, best first, under the mask they were ranked with.

    The mask acts on the codebook's output, never on its input, so under any larger mask a token
    selects exactly the first k codes of its ranking that are not disabled (``depth`` >= k + the
    number of codes disabled since). One forward pass serves every round of an iterative selection.
    """

    ids: torch.Tensor  # [tokens, depth] int32
    k: int
    num_codes: int
    # Bottleneck mode: a disabled code's slot goes to the next code of the ranking. Residual mode: the
    # mask never changes which codes a token reads, so counts under any mask are the unmasked counts.
    substitutes: bool = True

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])

    def counts(self, disabled: torch.Tensor | None = None) -> CodeCounts:
        """The counts a forward pass with ``disabled`` codes masked gives (it must include the ranking's mask)."""
        counts = torch.zeros(self.num_codes, dtype=torch.long)
        disabled = disabled.cpu() if disabled is not None else None
        for start in range(0, self.tokens, _RANKING_CHUNK):  # bounded memory on large sets
            ids = self.ids[start : start + _RANKING_CHUNK].long()
            if disabled is None or not self.substitutes:
                chosen = ids[:, : self.k]
            else:
                allowed = ~disabled[ids]
                taken = allowed & (allowed.cumsum(-1) <= self.k)
                if int(taken.sum(-1).min()) < self.k:
                    raise ValueError(
                        f"a ranking of depth {ids.shape[1]} has fewer than k={self.k} codes left enabled; "
                        "rank deeper (k + the number of codes disabled since ranking)"
                    )
                chosen = ids[taken]
            counts += torch.bincount(chosen.reshape(-1), minlength=self.num_codes)
        return CodeCounts(counts=counts, tokens=self.tokens, k=self.k)


_RANKING_CHUNK = 65536


def encode_for_counting(tokenizer: Any, records: Sequence[Any], max_length: int) -> list[Any]:
    """The records' token sequences as counting batches them: shortest first (a stable sort)."""
    return sorted(encode_qas(tokenizer, records, max_length, "select.max_length"), key=_length)


def shared_prefix_length(encoded: Sequence[Any]) -> int:
    """How many leading tokens every encoded record shares, leaving each at least one token of its own."""
    if not encoded:
        return 0
    rows = [e.input_ids for e in encoded]
    limit = min(len(row) for row in rows) - 1
    length = 0
    while length < limit and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


def _batches(
    encoded: Sequence[Any], pad_token_id: int, batch_size: int, positions: str
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Padded batches and, per batch, the positions whose codes count ("all" tokens or "answer" ones).

    The first token never counts: it is the attention sink (its norm ~100x the median), whose codes
    say nothing about the text and, counted, win the chi-squared test on any split of unequal sizes.
    Records are batched by length, which cuts padding; the sort is stable, so the batches are the same
    on every platform.
    """
    if positions not in ("all", "answer"):
        raise ValueError(f"positions must be 'all' or 'answer', got {positions!r}")
    batches = []
    for start in range(0, len(encoded), batch_size):
        batch = pad_batch(encoded[start : start + batch_size], pad_token_id)
        keep = batch["attention_mask"].bool()
        if positions == "answer":
            # The code at position t produces token t+1, so answer tokens are predicted from t-1 onwards.
            keep = torch.zeros_like(keep)
            keep[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        keep[:, 0] = False
        batches.append((batch, keep))
    return batches


def _length(encoded: Any) -> int:
    return len(encoded.input_ids)


def _forward(
    model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device, prefix: DynamicCache | None = None
) -> None:
    """The batch's forward pass; after ``prefix`` (the shared tokens' cache), only the tokens after them."""
    if prefix is None:
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(batch["input_ids"].shape[0])
    model(
        input_ids=batch["input_ids"][:, cache.get_seq_length() :].to(device),
        attention_mask=batch["attention_mask"].to(device),
        past_key_values=cache,
        use_cache=True,
    )


def _run_to_codebook(run: Any, captured: list[torch.Tensor]) -> torch.Tensor:
    """The code ranking the codebook's pre-hook captured in ``run()`` (which it stops there)."""
    captured.clear()
    try:
        run()
    except StopForward:
        pass
    if len(captured) != 1:
        raise ValueError("the codebook did not run in this model's forward: is it attached to this model?")
    return captured[0].cpu()


def ranked_code_batches(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    records: Sequence[Any],
    *,
    depth: int,
    masked: bool,
    batch_size: int,
    max_length: int,
    positions: str,
    progress: bool,
    desc: str,
    shared_prefix: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch: every token's ``depth`` most similar codes [batch, tokens, depth], the counted
    positions and the real (non-padding) tokens. The forward pass stops at the codebook's input: the
    blocks after it and the LM head never run. ``shared_prefix``: the records' common leading tokens
    run once (see the module's doc)."""
    captured: list[torch.Tensor] = []

    def rank(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        # The very expression CodebookBottleneck.forward takes its top k from (residual mode reads the
        # unmasked codes: its mask edits the output, never the choice).
        similarities = bottleneck.similarities(bottleneck.norm(args[0]), masked=masked and not bottleneck.residual)
        captured.append(similarities.topk(depth, dim=-1).indices)
        raise StopForward

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    handle = bottleneck.register_forward_pre_hook(rank)
    try:
        encoded = encode_for_counting(tokenizer, records, max_length)
        prefix, prefix_ids = None, None
        if shared_prefix and (length := shared_prefix_length(encoded)) > 0:
            prefix = DynamicCache(config=model.config)
            tokens = torch.tensor([encoded[0].input_ids[:length]], device=device)
            prefix_ids = _run_to_codebook(
                lambda: model(input_ids=tokens, past_key_values=prefix, use_cache=True), captured
            )
        batches = _batches(encoded, tokenizer.pad_token_id, batch_size, positions)
        for batch, keep in tqdm(batches, desc=desc, disable=not progress, leave=False):
            ids = _run_to_codebook(lambda batch=batch: _forward(model, batch, device, prefix), captured)
            if prefix_ids is not None:
                ids = torch.cat([prefix_ids.expand(ids.shape[0], -1, -1), ids], dim=1)
            yield ids, keep, batch["attention_mask"].bool()
    finally:
        handle.remove()
        bottleneck.token_mask = None
        model.train(was_training)


def ranking_depth(bottleneck: CodebookBottleneck, depth: int) -> int:
    """The codes ranked per token: at least the ``k`` the codebook selects, at most all of them."""
    return min(max(depth, bottleneck.spec.k), bottleneck.spec.num_codes)


@torch.inference_mode()
def rank_codes(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    records: Sequence[Any],
    *,
    depth: int,
    batch_size: int,
    max_length: int,
    positions: str,
    progress: bool = False,
    shared_prefix: bool = False,
) -> CodeRanking:
    """Each counted token's ``depth`` most similar codes under the bottleneck's current mask."""
    depth = ranking_depth(bottleneck, depth)
    counting = {
        "batch_size": batch_size,
        "max_length": max_length,
        "positions": positions,
        "shared_prefix": shared_prefix,
    }
    batches = ranked_code_batches(
        model,
        bottleneck,
        tokenizer,
        records,
        depth=depth,
        masked=True,
        progress=progress,
        desc="code ranks",
        **counting,
    )
    rows = [ids[keep].to(torch.int32) for ids, keep, _ in batches]
    ids = torch.cat(rows) if rows else torch.zeros((0, depth), dtype=torch.int32)
    return CodeRanking(
        ids=ids, k=bottleneck.spec.k, num_codes=bottleneck.spec.num_codes, substitutes=not bottleneck.residual
    )


@torch.inference_mode()
def count_codes(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    records: Sequence[Any],
    *,
    batch_size: int,
    max_length: int,
    positions: str,
    progress: bool = False,
    stop_early: bool = True,
    shared_prefix: bool = False,
) -> CodeCounts:
    """Count the codes selected on every real token of question+answer ("all") or on answer tokens only.

    With ``stop_early`` (the default) the forward pass stops at the codebook, which gives exactly the
    counts of a full forward (the code ids at block L do not depend on later blocks) at about half the cost.
    """
    if stop_early:
        counting = {
            "batch_size": batch_size,
            "max_length": max_length,
            "positions": positions,
            "shared_prefix": shared_prefix,
        }
        ranking = rank_codes(
            model, bottleneck, tokenizer, records, depth=bottleneck.spec.k, progress=progress, **counting
        )
        return ranking.counts()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(bottleneck.spec.num_codes, dtype=torch.long)
    tokens = 0
    try:
        encoded = encode_for_counting(tokenizer, records, max_length)
        batches = _batches(encoded, tokenizer.pad_token_id, batch_size, positions)
        for batch, keep in tqdm(batches, desc="code counts", disable=not progress, leave=False):
            _forward(model, batch, device)
            ids = bottleneck.last_ids.cpu()[keep]
            counts += torch.bincount(ids.reshape(-1), minlength=bottleneck.spec.num_codes)
            tokens += int(keep.sum())
    finally:
        model.train(was_training)
    return CodeCounts(counts=counts, tokens=tokens, k=bottleneck.spec.k)
