"""Evaluate one model on the run's evaluation sets: the numbers every report and leaderboard row uses.

``score_model`` runs the model once over every set (one greedy generation pass over all questions,
one teacher-forced pass over every gold / paraphrased / perturbed answer and the holdout answers)
and keeps per-item numbers only; ``summarize`` turns those into the run's metrics, comparing with
the oracle's (retain-only model's) per-item numbers where the metric needs a reference:

* TOFU (shared/reference/eval-anchors.md section 2): per split ROUGE-L recall, Prob and the
  truth-ratio statistic; Forget Quality = KS p-value of the model's forget-split truth ratios
  against the oracle's; Model Utility = harmonic mean of the nine retain / real-authors /
  world-facts numbers. ``retain_utility`` (the same over the three retain numbers) is added because
  a model trained from scratch (the smoke profile) knows no real authors or world facts, which
  pins its Model Utility near zero whatever unlearning does.
* Membership inference on answer tokens (open-unlearning's TOFU MIA: the QA in the model's prompt
  format, scored on the answer tokens), forget QAs as members, holdout QAs (authors never trained
  on) as non-members: ``mia_min_k_auc`` (Min-K% Prob) and ``mia_loss_auc`` (LOSS), 1.0 = the forget
  set still looks like training data, 0.5 = indistinguishable from unseen authors. ``privleak`` is
  MUSE's relative AUC, (AUC - AUC_oracle) / AUC_oracle x 100 in MUSE's orientation
  (``metrics.muse.muse_auc``), with AUC_oracle measured on *this run's* oracle, never a constant:
  0 = leaks like the oracle, strongly negative = under-unlearned, strongly positive = over-unlearned.

Nothing here returns or logs generated text: a model's answers may quote the forget set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from codeunlearn.data.forget_files import ChoiceRecord, PassageRecord
from codeunlearn.lm.generation import answer_token_logprobs, generate_answers, mean_nll
from codeunlearn.lm.prompting import encode_qa, pad_batch
from codeunlearn.lm.training import to_device
from codeunlearn.metrics import get_metric
from codeunlearn.metrics.choice import choice_accuracy, choice_accuracy_norm, option_byte_lengths, option_loglikelihoods
from codeunlearn.metrics.passage import passage_min_k, passage_verbmem
from codeunlearn.metrics.sets import PARAPHRASE_SPLITS, EvalSets, EvalSpec, GenerationSpec, has_truth_ratio_data
from codeunlearn.metrics.tofu import (
    UTILITY_SPLITS,
    answer_probability,
    forget_truth_ratio_stat,
    model_utility_inputs,
    normalized_probability,
    retain_truth_ratio_stat,
    rouge_l_recall,
    truth_ratio,
)

log = logging.getLogger(__name__)
# A score that needs its own data (model, tokenizer, progress) -> value: ``request_scores``' ``extra``.
ExtraScore = Callable[[nn.Module, Any, bool], float]

# Membership-inference attacks, each a METRICS name scoring one item from its answer-token log-probs
# (with the ``EvalSpec`` field it takes, if any). A row reports each attack's AUC (``mia_<attack>_auc``)
# and, against the oracle, its PrivLeak (``PRIVLEAK_KEYS``). Adding an attack is a registry entry and a line here.
MIA_ATTACKS: dict[str, tuple[str, str | None]] = {
    "min_k": ("mia.min_k_prob_score", "min_k"),
    "loss": ("mia.loss_score", None),
}
PRIVLEAK_KEYS = {"min_k": "privleak", "loss": "privleak_loss"}


@dataclass
class ModelScores:
    """Per-item numbers of one model (no text): TOFU results per split and MIA scores."""

    splits: dict[str, dict[str, Any]]
    mia: dict[str, list[float]] = field(default_factory=dict)


def split_rouge(
    model: nn.Module, tokenizer: Any, records: Sequence[Any], spec: GenerationSpec, progress: bool = False
) -> float:
    """Mean ROUGE-L recall of greedy answers against the gold answers (TOFU's ROUGE)."""
    return split_rouges(model, tokenizer, [records], spec, progress)[0]


def split_rouges(
    model: nn.Module,
    tokenizer: Any,
    record_sets: Sequence[Sequence[Any]],
    spec: GenerationSpec,
    progress: bool = False,
) -> list[float]:
    """``split_rouge`` of each set, from one generation pass over all their questions.

    A decoding step's cost grows slowly with its rows (SmolLM2-135M on two cores: 40 answers in one
    batch took 34 s, in four batches of 10 72 s), so sets scored under the same model state share batches.
    """
    by_item = split_rouge_by_item(model, tokenizer, [r for records in record_sets for r in records], spec, progress)
    means, start = [], 0
    for records in record_sets:
        means.append(float(np.mean(by_item[start : start + len(records)])))
        start += len(records)
    return means


def split_rouge_by_item(
    model: nn.Module, tokenizer: Any, records: Sequence[Any], spec: GenerationSpec, progress: bool = False
) -> list[float]:
    answers = generate_answers(
        model, tokenizer, [r.question for r in records], spec.max_new_tokens, spec.batch_size, progress=progress
    )
    return rouge_l_recall(answers, [r.answer for r in records])


def forget_retain_rouge(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Any],
    retain: Sequence[Any],
    spec: GenerationSpec,
    progress: bool = False,
) -> dict[str, float]:
    forget_rouge, retain_rouge = split_rouges(model, tokenizer, [forget, retain], spec, progress)
    return {"forget_rouge": forget_rouge, "retain_rouge": retain_rouge}


def _check_records(kind: str, records: Sequence[Any]) -> None:
    for index, record in enumerate(records):
        if not has_truth_ratio_data(record, kind):
            what = "paraphrased_answer or perturbed_answers" if kind in PARAPHRASE_SPLITS else "perturbed_answers"
            raise ValueError(
                f"{kind} record {index} (id {getattr(record, 'id', '?')}): {what} missing; the truth ratio "
                "needs them (TOFU perturbs authors 0-19 and 180-199 only)"
            )


class _Requests:
    """Scoring requests gathered from every set, so one teacher-forced pass serves every metric."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    def add(self, pairs: Sequence[tuple[str, str]]) -> range:
        start = len(self.pairs)
        self.pairs.extend(pairs)
        return range(start, len(self.pairs))


def score_model(
    model: nn.Module, tokenizer: Any, sets: EvalSets, spec: EvalSpec, progress: bool = False
) -> ModelScores:
    """Per-item TOFU numbers for every non-empty split of ``sets`` and MIA scores when a holdout is given."""
    splits = sets.tofu_splits()
    if "forget" not in splits:
        raise ValueError("no forget records to evaluate")
    questions = [record.question for records in splits.values() for record in records]
    generated = generate_answers(model, tokenizer, questions, spec.max_new_tokens, spec.batch_size, progress)
    return _score_splits(model, tokenizer, splits, sets.holdout, generated, spec, progress)


def request_scores(
    model: nn.Module,
    tokenizer: Any,
    forget: Sequence[Any],
    utility: EvalSets,
    spec: EvalSpec,
    progress: bool = False,
    neighbour: Sequence[Any] = (),
    extra: Mapping[str, ExtraScore] | None = None,
) -> dict[str, float]:
    """A request's numbers: forget ROUGE on its own records beside the model utility of ``utility``'s
    retain / real-authors / world-facts sets and each set's ROUGE, Prob and truth ratio, and, given the
    held-out part of a neighbour set, its ROUGE and answer probability (``neighbour_rouge``,
    ``neighbour_prob``), or for passage neighbours their VerbMem (``neighbour_verbmem``, as the forget
    passages'). ``extra`` adds a score by name, computed on the same model: a passage request's
    ``knowmem_retain``, MUSE's KnowMem on other news it must keep (``eval.muse.knowmem_score``). One
    decoding pass serves every question.

    The forget records' kind sets what ``forget_rouge`` is (``data.forget_files``): a QA's ROUGE-L recall
    of the greedy answer; a multiple-choice question's, of its right option, beside ``forget_choice_acc``
    and ``forget_choice_acc_norm`` (lm-eval's accuracy by the options' log-likelihood); a passage's,
    MUSE's VerbMem continuation ROUGE over its windows (``spec.passage``), beside ``forget_min_k``, its
    mean Min-K% membership score (higher = less like training data)."""
    passages = [r for r in forget if isinstance(r, PassageRecord)]
    choices = [r for r in forget if isinstance(r, ChoiceRecord)]
    qas = [r.as_qa() if isinstance(r, ChoiceRecord) else r for r in forget if not isinstance(r, PassageRecord)]
    splits = {kind: records for kind, records in utility.tofu_splits().items() if kind != "forget"}
    neighbour_passages = [r for r in neighbour if isinstance(r, PassageRecord)]
    neighbour_qas = [r for r in neighbour if not isinstance(r, PassageRecord)]
    own = [*qas, *neighbour_qas]
    questions = [r.question for r in own] + [r.question for records in splits.values() for r in records]
    generated = generate_answers(model, tokenizer, questions, spec.max_new_tokens, spec.batch_size, progress)
    row: dict[str, float] = {}
    if qas:
        row["forget_rouge"] = float(np.mean(rouge_l_recall(generated[: len(qas)], [r.answer for r in qas])))
    if choices:
        row.update(_choice_scores(model, tokenizer, choices, spec, progress))
    if passages:
        row.update(_passage_scores(model, tokenizer, passages, spec, progress))
    if neighbour_qas:
        row.update(_neighbour_scores(model, tokenizer, neighbour_qas, generated[len(qas) : len(own)], spec, progress))
    if neighbour_passages:
        row["neighbour_verbmem"] = _verbmem(model, tokenizer, neighbour_passages, spec, progress)
    for name, score in (extra or {}).items():
        row[name] = score(model, tokenizer, progress)
    if splits:
        row.update(summarize(_score_splits(model, tokenizer, splits, (), generated[len(own) :], spec, progress)))
    return row


def _choice_scores(
    model: nn.Module, tokenizer: Any, records: Sequence[ChoiceRecord], spec: EvalSpec, progress: bool
) -> dict[str, float]:
    loglikelihoods = option_loglikelihoods(model, tokenizer, records, spec.score_batch_size, spec.max_length, progress)
    answers = [r.answer for r in records]
    return {
        "forget_choice_acc": choice_accuracy(loglikelihoods, answers),
        "forget_choice_acc_norm": choice_accuracy_norm(loglikelihoods, option_byte_lengths(records), answers),
    }


def _passage_scores(
    model: nn.Module, tokenizer: Any, records: Sequence[PassageRecord], spec: EvalSpec, progress: bool
) -> dict[str, float]:
    verbmem = _verbmem(model, tokenizer, records, spec, progress)
    texts = [r.text for r in records]
    window_tokens = spec.passage.window_tokens
    return {
        "forget_rouge": verbmem,
        "forget_min_k": float(
            np.mean(passage_min_k(model, tokenizer, texts, window_tokens, spec.score_batch_size, spec.min_k))
        ),
    }


def _verbmem(
    model: nn.Module, tokenizer: Any, records: Sequence[PassageRecord], spec: EvalSpec, progress: bool
) -> float:
    """``metrics.passage.passage_verbmem`` of the passages, windowed as ``spec.passage`` says."""
    if spec.passage is None:
        raise ValueError("passage records need EvalSpec.passage (forget_set.passage in params.yaml)")
    passage = spec.passage
    texts = [r.text for r in records]
    return passage_verbmem(
        model, tokenizer, texts, passage.prompt_tokens, passage.continuation_tokens, spec.batch_size, progress
    )


def _neighbour_scores(
    model: nn.Module, tokenizer: Any, records: Sequence[Any], generated: Sequence[str], spec: EvalSpec, progress: bool
) -> dict[str, float]:
    """Mean ROUGE-L recall of the greedy answers and mean answer probability (exp of the mean token NLL)."""
    pairs = [(r.question, r.answer) for r in records]
    logprobs = answer_token_logprobs(model, tokenizer, pairs, spec.score_batch_size, spec.max_length, progress)
    return {
        "neighbour_rouge": float(np.mean(rouge_l_recall(generated, [r.answer for r in records]))),
        "neighbour_prob": float(np.mean(answer_probability([mean_nll(lp) for lp in logprobs]))),
    }


def _score_splits(
    model: nn.Module,
    tokenizer: Any,
    splits: dict[str, Sequence[Any]],
    holdout_records: Sequence[Any],
    generated: Sequence[str],
    spec: EvalSpec,
    progress: bool,
) -> ModelScores:
    """TOFU's per-item numbers of ``splits`` from their greedy answers (``generated``, in split order)."""
    for kind, records in splits.items():
        _check_records(kind, records)

    requests = _Requests()
    layout: dict[str, dict[str, Any]] = {}
    for kind, records in splits.items():
        gold = requests.add([(r.question, r.answer) for r in records])
        base = (
            requests.add([(r.question, r.paraphrased_answer) for r in records]) if kind in PARAPHRASE_SPLITS else gold
        )
        perturbed = [requests.add([(r.question, a) for a in r.perturbed_answers]) for r in records]
        layout[kind] = {"gold": gold, "base": base, "perturbed": perturbed}
    holdout = requests.add([(r.question, r.answer) for r in holdout_records]) if len(holdout_records) else None
    logprobs = answer_token_logprobs(
        model, tokenizer, requests.pairs, spec.score_batch_size, spec.max_length, progress, "evaluate.max_length"
    )
    nlls = [mean_nll(item) for item in logprobs]

    results: dict[str, dict[str, Any]] = {}
    offset = 0
    for kind, records in splits.items():
        answers = generated[offset : offset + len(records)]
        offset += len(records)
        where = layout[kind]
        gold_nlls = [nlls[i] for i in where["gold"]]
        base_nlls = [nlls[i] for i in where["base"]]
        perturbed_nlls = [[nlls[i] for i in rng] for rng in where["perturbed"]]
        rouge = rouge_l_recall(answers, [r.answer for r in records])
        if kind in PARAPHRASE_SPLITS:
            prob = answer_probability(gold_nlls)
        else:
            prob = normalized_probability(gold_nlls, perturbed_nlls)
        ratios = truth_ratio(base_nlls, perturbed_nlls)
        stat = forget_truth_ratio_stat(ratios) if kind == "forget" else retain_truth_ratio_stat(ratios)
        results[kind] = {
            "rouge": float(np.mean(rouge)),
            "prob": float(np.mean(prob)),
            "truth_ratio": stat,
            "rouge_by_item": rouge,
            "prob_by_item": prob,
            "truth_ratios": ratios,
            "n": len(records),
        }

    scores: dict[str, list[float]] = {}
    if holdout is not None:
        members = {"forget": [logprobs[i] for i in layout["forget"]["gold"]], "holdout": [logprobs[i] for i in holdout]}
        for attack, (metric, option) in MIA_ATTACKS.items():
            score, args = get_metric(metric), ((getattr(spec, option),) if option else ())
            for kind, items in members.items():
                scores[f"{kind}_{attack}"] = [score(lp, *args) for lp in items]
    return ModelScores(splits=results, mia=scores)


def _privleak(scores: ModelScores, oracle: ModelScores, attack: str) -> float | None:
    muse_auc = get_metric("muse.muse_auc")
    auc = muse_auc(scores.mia[f"forget_{attack}"], scores.mia[f"holdout_{attack}"])
    reference = muse_auc(oracle.mia[f"forget_{attack}"], oracle.mia[f"holdout_{attack}"])
    if reference <= 0:
        return None  # the oracle ranks every holdout item above every forget item: undefined ratio
    return get_metric("muse.privleak")(auc, reference)


def summarize(scores: ModelScores, oracle: ModelScores | None = None) -> dict[str, float]:
    """The run's metrics of one model; keys present only where their inputs were measured.

    ``oracle`` is the retain-only model's ``ModelScores`` on the same items (``scores`` itself for
    the oracle row: forget quality 1.0, privleak 0).
    """
    out: dict[str, float] = {}
    for kind, result in scores.splits.items():
        out[f"{kind}_rouge"] = float(result["rouge"])
        out[f"{kind}_prob"] = float(result["prob"])
        out[f"{kind}_truth_ratio"] = float(result["truth_ratio"])
    if oracle is not None and "forget" in oracle.splits:
        mine, reference = scores.splits["forget"], oracle.splits["forget"]
        if mine["n"] != reference["n"]:
            raise ValueError(f"forget quality needs the same items: {mine['n']} vs the oracle's {reference['n']}")
        out["forget_quality"] = get_metric("tofu.forget_quality")(mine["truth_ratios"], reference["truth_ratios"])
    model_utility = get_metric("tofu.model_utility")
    if all(kind in scores.splits for kind in UTILITY_SPLITS):
        out["model_utility"] = model_utility(model_utility_inputs(scores.splits))
    if "retain" in scores.splits:
        retain = scores.splits["retain"]
        out["retain_utility"] = model_utility([retain["prob"], retain["rouge"], retain["truth_ratio"]])
    if scores.mia:
        mia_auc = get_metric("mia.mia_auc")
        for attack in MIA_ATTACKS:
            out[f"mia_{attack}_auc"] = mia_auc(scores.mia[f"forget_{attack}"], scores.mia[f"holdout_{attack}"])
        if oracle is not None and oracle.mia:
            for attack, key in PRIVLEAK_KEYS.items():
                value = _privleak(scores, oracle, attack)
                if value is not None:
                    out[key] = value
    return out


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    sets: EvalSets,
    spec: EvalSpec,
    oracle: ModelScores | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], ModelScores]:
    """``summarize(score_model(...), oracle)``; with ``oracle=None`` the model is its own reference."""
    scores = score_model(model, tokenizer, sets, spec, progress)
    return summarize(scores, oracle if oracle is not None else scores), scores


@torch.inference_mode()
def same_logits(
    first: nn.Module, second: nn.Module, tokenizer: Any, records: Sequence[Any], batch_size: int, max_length: int
) -> bool:
    """Whether two models give bit-identical logits on every QA of ``records`` (prompt and answer): the
    proof that lets an evaluation reuse one model's row for the other instead of scoring it twice."""
    encoded = [encode_qa(tokenizer, r.question, r.answer, max_length) for r in records]
    for start in range(0, len(encoded), batch_size):
        batch = pad_batch(encoded[start : start + batch_size], tokenizer.pad_token_id)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = [
            model(**to_device(inputs, next(model.parameters()).device), use_cache=False).logits.cpu()
            for model in (first, second)
        ]
        if not torch.equal(*logits):
            return False
    return True


def per_item(scores: ModelScores) -> dict[str, Any]:
    """The per-item numbers of ``scores`` (JSON-ready, no text): truth ratios, ROUGE, Prob, MIA scores."""
    return {
        "splits": {
            kind: {key: result[key] for key in ("rouge_by_item", "prob_by_item", "truth_ratios", "n")}
            for kind, result in scores.splits.items()
        },
        "mia": dict(scores.mia),
    }


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> flat ``a.b.c`` keys with numeric leaves only (MLflow keys, flow return value)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
