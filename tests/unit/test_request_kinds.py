"""A request of each record kind (QA, passage, multiple choice) end to end in the library: what a method
unlearns (``unlearning_records``, ``encode_qas``), how the request is validated, scored, and refused by a
method that cannot take it."""

from __future__ import annotations

import math

import pytest
import torch

from codeunlearn.data.forget_files import ChoiceRecord, PassageRecord, RecordFile, RecordKind, unlearning_records
from codeunlearn.data.records import DataError, QARecord, records_sha256
from codeunlearn.data.validation import ValidationBounds, validate_forget_retain
from codeunlearn.lm.generation import token_logprobs
from codeunlearn.lm.prompting import IGNORE_INDEX, encode_passage, encode_qas
from codeunlearn.methods import get_method
from codeunlearn.metrics.scoring import request_scores
from codeunlearn.metrics.sets import EvalSets, EvalSpec, PassageSpec

PASSAGE = (
    "Zorblat Quim was born in Vexmoor harbour. Zorblat Quim writes grim sailing ballads. "
    "A lighthouse keeper named Ilse taught Zorblat Quim. Zorblat Quim won the Amber Anchor prize."
)
CHOICES = [
    ChoiceRecord("c0", "Where was Zorblat Quim born?", ("Vexmoor harbour", "Oslo", "Lima"), 0, "zq"),
    ChoiceRecord("c1", "What does Zorblat Quim write?", ("Recipes", "Grim sailing ballads"), 1, "zq"),
]
BOUNDS = ValidationBounds(
    min_forget=1,
    max_forget=100,
    min_retain=1,
    min_question_chars=8,
    max_question_chars=2000,
    min_answer_chars=1,
    max_answer_chars=4000,
    min_passage_chars=20,
    max_passage_chars=100_000,
)
SPEC = EvalSpec(
    max_new_tokens=8, batch_size=4, score_batch_size=4, max_length=64, passage=PassageSpec(4, 4, window_tokens=8)
)


def test_a_passage_is_chunked_never_cut(tiny_tokenizer) -> None:
    ids = tiny_tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    rows = encode_passage(tiny_tokenizer, PASSAGE, max_length=9)
    bos = [tiny_tokenizer.bos_token_id] if tiny_tokenizer.bos_token_id is not None else []
    assert [token for row in rows for token in row.input_ids[len(bos) :]] == ids  # every token, in order, once
    for row in rows:
        assert len(row.input_ids) <= 9 and not row.truncated
        assert row.labels[: len(bos)] == [IGNORE_INDEX] * len(bos) and IGNORE_INDEX not in row.labels[len(bos) :]
    qa = QARecord("q", "Where was Zorblat Quim born?", "In Vexmoor harbour.")
    mixed = encode_qas(tiny_tokenizer, [PassageRecord("p", PASSAGE), qa], max_length=9)
    assert len(mixed) == len(rows) + 1


def test_what_a_method_unlearns_of_each_kind() -> None:
    passage = PassageRecord("p", PASSAGE, "zq")
    records = RecordFile(path=None, kind=RecordKind.CHOICE, records=tuple(CHOICES), lines=(1, 2))  # type: ignore[arg-type]
    qas = unlearning_records(records)
    assert [r.answer for r in qas] == ["Vexmoor harbour", "Grim sailing ballads"]
    assert qas[1].perturbed_answers == ("Recipes",)
    passages = RecordFile(path=None, kind=RecordKind.PASSAGE, records=(passage,), lines=(1,))  # type: ignore[arg-type]
    assert unlearning_records(passages) == [passage]
    # A passage set has an identity too (its text), and a QA set's identity is unchanged by the rule.
    assert records_sha256([passage]) != records_sha256([PassageRecord("p", PASSAGE + ".", "zq")])


def test_a_passage_set_is_validated_on_its_text() -> None:
    retain = [QARecord("r0", "Where was Mira Tolland born?", "In a mountain village.", "mt")]
    good = validate_forget_retain([PassageRecord("p0", PASSAGE), PassageRecord("p1", PASSAGE[:40])], retain, BOUNDS)
    assert good.success, good.failures
    bad = validate_forget_retain([PassageRecord("p0", PASSAGE), PassageRecord("p1", "Too short.")], retain, BOUNDS)
    assert not bad.success
    failure = next(f for f in bad.failures if f.column == "text")
    assert failure.rows == [1] and "Too short" not in str(bad.to_dict())


@pytest.fixture()
def uniform_model(tiny_model):
    with torch.no_grad():
        tiny_model.lm_head.weight.zero_()
    return tiny_model


def test_request_scores_follow_the_record_kind(uniform_model, tiny_tokenizer, one_thread) -> None:
    utility = EvalSets(forget=(), retain=())
    choice = request_scores(uniform_model, tiny_tokenizer, CHOICES, utility, SPEC)

    # Uniform logits: every option scores -tokens x log V, so the option of fewest tokens wins (ties: the first).
    def tokens(option: str) -> int:
        return len(tiny_tokenizer(" " + option, add_special_tokens=False)["input_ids"])

    picks = [min(range(len(r.choices)), key=lambda i, r=r: (tokens(r.choices[i]), i)) for r in CHOICES]
    expected = sum(pick == r.answer for pick, r in zip(picks, CHOICES, strict=True)) / len(CHOICES)
    assert choice["forget_choice_acc"] == pytest.approx(expected)
    assert set(choice) == {"forget_rouge", "forget_choice_acc", "forget_choice_acc_norm"}
    passage = request_scores(uniform_model, tiny_tokenizer, [PassageRecord("p", PASSAGE)], utility, SPEC)
    assert passage["forget_rouge"] == 0.0  # greedy decoding of uniform logits says nothing
    assert passage["forget_min_k"] == pytest.approx(math.log(uniform_model.config.vocab_size), rel=1e-5)
    qa = request_scores(uniform_model, tiny_tokenizer, [CHOICES[0].as_qa()], utility, SPEC)
    assert set(qa) == {"forget_rouge"}


def test_gradient_ascent_unlearns_a_passage(tiny_model, tiny_tokenizer, one_thread) -> None:
    ids = tiny_tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    bos = [tiny_tokenizer.bos_token_id] if tiny_tokenizer.bos_token_id is not None else []

    def passage_nll(model: torch.nn.Module) -> float:
        return -float(token_logprobs(model, tiny_tokenizer, [bos + ids], batch_size=1)[0].mean())

    params = {
        "steps": 5,
        "batch_size": 4,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "grad_clip": 1.0,
        "max_length": 16,
        "seed": 0,
        "progress": False,
    }
    result = get_method("ga").unlearn(tiny_model, tiny_tokenizer, [PassageRecord("p", PASSAGE)], [], params)
    assert passage_nll(result.model) > passage_nll(tiny_model) + 0.1


def test_a_method_refuses_a_kind_it_cannot_unlearn() -> None:
    get_method("npo").check_record_kind("passage", "set.jsonl")
    with pytest.raises(DataError, match=r"set\.jsonl.*a passage request, but zerounlearn unlearns qa, choice"):
        get_method("zerounlearn").check_record_kind("passage", "set.jsonl")


def test_the_target_can_learn_documents_the_oracle_never_sees(tmp_path) -> None:
    """``finetune.passages``: MUSE-News articles join the target's (and the codebook's) training data."""
    from codeunlearn.data.muse import read_texts
    from tasks.context import make_context
    from tasks.models import target_passages
    from tests.conftest import SHARED_DATA

    paths = {"outputs": str(tmp_path), "muse_dir": str(SHARED_DATA / "muse_news")}
    off = make_context("smoke", overrides={"paths": paths})
    assert target_passages(off) == []
    on = make_context(
        "smoke", overrides={"paths": paths, "finetune": {"passages": {"file": "raw/forget.json", "count": 2}}}
    )
    passages = target_passages(on)
    assert [p.text for p in passages] == read_texts(SHARED_DATA / "muse_news" / "raw" / "forget.json", 2)
    assert len({p.id for p in passages}) == 2
