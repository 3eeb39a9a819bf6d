"""A control set's code statistics, computed once per codebook and control data, reused by every request.

The control set (the retain authors, or a user's neighbour file's control part) does not depend on the
forget set: its tokens' code rankings are the same for every request on the same codebook. Cached, a
request forwards only its own forget set; the enrichment counts and the gate's threshold come from the
cached ids (bit for bit what a forward pass gives: the same batches, the same similarities).

The cache holds each real token's ``depth`` most similar codes, unmasked, best first: under any mask a
token selects the first k of them that are not disabled (bottleneck mode), or the first k (residual
mode), so one cache serves every later request while it is deep enough. It records the sha256 of the
codebook and of the control records it was computed from, and the batching that produced it; a cache
whose identity differs from the request's is refused (``StaleControlStatisticsError``), never used.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from codeunlearn.io import atomic_write_bytes
from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, peak_fire_rate
from codeunlearn.methods.codeunlearn.counting import CodeRanking, ranked_code_batches, ranking_depth

STATS_TENSORS = "control_stats.safetensors"
STATS_META = "control_stats.json"


class StaleControlStatisticsError(ValueError):
    """Cached statistics of another codebook, another control set or another batching."""


@dataclass(frozen=True)
class CountingSettings:
    """How the control was batched and which tokens count: a cache is valid only under the same ones."""

    batch_size: int
    max_length: int
    positions: str
    shared_prefix: bool = False  # the control's common leading tokens ran once (``counting``)


@dataclass(frozen=True)
class ControlStatistics:
    ids: torch.Tensor  # [real tokens, depth] int32: every real token's most similar codes, unmasked, best first
    counted: torch.Tensor  # [real tokens] bool: the token counts in the enrichment test (``positions``)
    lengths: torch.Tensor  # [sequences] int64: real tokens per sequence, in batch order
    k: int
    num_codes: int
    substitutes: bool  # bottleneck mode: a disabled code's slot goes to the next code of the ranking
    codebook_sha256: str
    control_sha256: str
    counting: CountingSettings

    @property
    def depth(self) -> int:
        return int(self.ids.shape[1])

    def covers(self, depth: int, disabled: int) -> bool:
        """Deep enough for a selection ranking ``depth`` codes with ``disabled`` codes already masked."""
        needed = depth + disabled if self.substitutes else self.k
        return self.depth >= min(needed, self.num_codes)

    def ranking(self) -> CodeRanking:
        """The counted tokens' rankings, as ``rank_codes`` gives them with nothing masked."""
        return CodeRanking(ids=self.ids[self.counted], k=self.k, num_codes=self.num_codes, substitutes=self.substitutes)

    def peak_fire_rates(self, watched: torch.Tensor, min_tokens: int) -> torch.Tensor:
        """[sequences]: each sequence's peak running fire rate of the ``watched`` codes on its real tokens
        (``peak_fire_rate`` on the unmasked top k), computed from the cached ids without a forward pass."""
        fires_flat = watched[self.ids[:, : self.k].long()].any(-1)
        width = int(self.lengths.max()) if len(self.lengths) else 0
        real = torch.arange(width).unsqueeze(0) < self.lengths.unsqueeze(1)
        fires = torch.zeros(real.shape, dtype=torch.bool)
        fires[real] = fires_flat
        return peak_fire_rate(fires, real, min_tokens)


@torch.inference_mode()
def compute_control_statistics(
    model: nn.Module,
    bottleneck: CodebookBottleneck,
    tokenizer: Any,
    records: Sequence[Any],
    *,
    depth: int,
    counting: CountingSettings,
    codebook_sha256: str,
    control_sha256: str,
    progress: bool = False,
) -> ControlStatistics:
    """One forward pass of ``records`` up to the codebook: every real token's ``depth`` best codes."""
    depth = ranking_depth(bottleneck, depth)
    ids, counted, lengths = [], [], []
    batches = ranked_code_batches(
        model,
        bottleneck,
        tokenizer,
        records,
        depth=depth,
        masked=False,
        progress=progress,
        desc="control statistics",
        **asdict(counting),
    )
    for batch_ids, keep, real in batches:
        ids.append(batch_ids[real].to(torch.int32))
        counted.append(keep[real])
        lengths.append(real.sum(-1))
    return ControlStatistics(
        ids=torch.cat(ids) if ids else torch.zeros((0, depth), dtype=torch.int32),
        counted=torch.cat(counted) if counted else torch.zeros(0, dtype=torch.bool),
        lengths=torch.cat(lengths).long() if lengths else torch.zeros(0, dtype=torch.long),
        k=bottleneck.spec.k,
        num_codes=bottleneck.spec.num_codes,
        substitutes=not bottleneck.residual,
        codebook_sha256=codebook_sha256,
        control_sha256=control_sha256,
        counting=counting,
    )


def save_control_statistics(stats: ControlStatistics, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"ids": stats.ids.contiguous(), "counted": stats.counted.contiguous(), "lengths": stats.lengths}
    atomic_write_bytes(out_dir / STATS_TENSORS, save(tensors))
    meta = {
        "codebook_sha256": stats.codebook_sha256,
        "control_sha256": stats.control_sha256,
        "counting": asdict(stats.counting),
        "k": stats.k,
        "num_codes": stats.num_codes,
        "substitutes": stats.substitutes,
        "depth": stats.depth,
        "tokens": int(stats.ids.shape[0]),
        "sequences": int(stats.lengths.shape[0]),
    }
    # The JSON last: a cache whose JSON exists has its tensors written.
    atomic_write_bytes(out_dir / STATS_META, json.dumps(meta, indent=2, sort_keys=True).encode())


def load_control_statistics(
    directory: Path, *, codebook_sha256: str, control_sha256: str, counting: CountingSettings
) -> ControlStatistics:
    """The cached statistics in ``directory``; refuses (``StaleControlStatisticsError``, naming the recorded
    and the current hashes) statistics of another codebook, another control set or another batching."""
    meta_path = directory / STATS_META
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: no cached control statistics")
    meta = json.loads(meta_path.read_text())
    problems = []
    if meta["codebook_sha256"] != codebook_sha256:
        problems.append(f"codebook_sha256 is {meta['codebook_sha256']}, the loaded codebook's is {codebook_sha256}")
    if meta["control_sha256"] != control_sha256:
        problems.append(f"control_sha256 is {meta['control_sha256']}, the request's control's is {control_sha256}")
    if meta["counting"] != asdict(counting):
        problems.append(f"counting is {meta['counting']}, the request's is {asdict(counting)}")
    if problems:
        raise StaleControlStatisticsError(f"{meta_path}: stale control statistics, not used: " + "; ".join(problems))
    tensors = load_file(str(directory / STATS_TENSORS))
    return ControlStatistics(
        ids=tensors["ids"],
        counted=tensors["counted"],
        lengths=tensors["lengths"],
        k=int(meta["k"]),
        num_codes=int(meta["num_codes"]),
        substitutes=bool(meta["substitutes"]),
        codebook_sha256=meta["codebook_sha256"],
        control_sha256=meta["control_sha256"],
        counting=counting,
    )
