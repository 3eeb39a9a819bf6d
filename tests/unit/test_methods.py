"""Every unlearning method on a tiny Llama that has memorised a few synthetic facts.

One module-scoped model learns 8 forget and 16 retain QAs; each method must then raise the mean
answer NLL of the forget set, leave the caller's model untouched, report its time and memory, and
give bit-identical weights for the same seed. The flow-level acceptance (forget ROUGE drops on the
smoke profile) lives in the integration tests; here NLL is the faster, smoother signal.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from codeunlearn.checkpoints import model_sha256
from codeunlearn.data.records import QARecord
from codeunlearn.lm.generation import generate_answers
from codeunlearn.lm.training import TrainSpec, train_answers
from codeunlearn.methods import METHODS, get_method
from codeunlearn.metrics.tofu import rouge_l_recall
from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama, train_tokenizer
from tests.helpers import answer_nlls

NAMES = [
    "Alon Brask", "Mira Odell", "Tomas Vey", "Ilka Ruhn", "Pavel Stroud", "Nadia Quell", "Oren Falk", "Sela Varn",
    "Bruno Ketter", "Clea Moss", "Dario Penn", "Elsa Grint", "Fenn Holt", "Gita Lorn", "Hugo Marsh", "Iris Nye",
    "Jonas Pell", "Kira Sund", "Lars Tove", "Mona Wick", "Nils Yarrow", "Olga Zent", "Piet Aalto", "Rosa Bligh",
]  # fmt: skip
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Lima", "Riga"]
GENRES = ["sea poems", "war novels", "ghost tales", "road diaries", "court dramas", "bird essays"]
N_FORGET = 8
SEED = 0
MAX_LENGTH = 64
# Shared knobs of the gradient loop; each method block below adds its own (as params.yaml will).
LOOP = {
    "batch_size": 4,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "grad_clip": 1.0,
    "max_length": MAX_LENGTH,
    "seed": SEED,
    "progress": False,
}
PARAMS: dict[str, dict[str, Any]] = {
    "ga": {**LOOP, "steps": 10, "lr": 1e-3},
    "graddiff": {**LOOP, "steps": 10, "lr": 1e-3, "retain_weight": 1.0},
    "npo": {**LOOP, "steps": 10, "lr": 1e-3, "beta": 0.1, "retain_weight": 1.0},
    "rmu": {
        **LOOP,
        "steps": 25,
        "lr": 1e-2,
        "layer": 1,
        "update_layers": [0, 1],
        "param_regex": r"mlp\.(down|up|gate)_proj\.weight",
        "steering_coeff": 20.0,
        "alpha": 100.0,
    },
    "grin": {
        **LOOP,
        "steps": 10,
        "lr": 1e-2,
        "weight_decay": 0.01,  # exercises the reset of unselected weights after AdamW's decay
        "score_batches": 2,
        "fraction": 0.05,
        "eps": 1e-8,
        "noise_std": 0.1,
        "param_regex": r"model\.layers\.\d+\..*proj\.weight",
        "loss": "npo",
        "beta": 0.1,
        "retain_weight": 1.0,
    },
    "zerounlearn": {
        "variant": "closed_form",
        # Block 0 of 2: the target residual is set after block 0, so block 1's attention carries it
        # to the answer positions (set after the last block, only the first answer token could move).
        "layers": [0],
        "module": "mlp.down_proj",
        "target_text": "",  # EOS, the reference's default: a 2-layer model cannot be taught a new phrase
        "target_steps": 25,
        "target_lr": 0.1,
        "target_weight_decay": 0.5,
        "clamp_norm_factor": 0.75,
        "rank": 2,
        "delta": 0.01,
        "retain_weight": 100.0,
        "forget_weight": 50.0,
        "regularization": 1.0,
        "steps": 100,
        "lr": 1e-2,
        "null_threshold": 1e-2,
        "sensitive_weight": 1.0,
        "value_weight": 100.0,
        "update_weight": 0.1,
        "batch_size": 8,
        "max_length": MAX_LENGTH,
        "seed": SEED,
        "progress": False,
    },
}
GRADIENT_VARIANT = {**PARAMS["zerounlearn"], "variant": "gradient"}
BASELINES = sorted(name for name in METHODS if name != "codeunlearn")


def make_records() -> tuple[list[QARecord], list[QARecord]]:
    records = [
        QARecord(
            id=f"q{i:02d}",
            question=f"Where was {name} born?",
            answer=f"{name} was born in {CITIES[i % len(CITIES)]} and wrote {GENRES[i % len(GENRES)]}.",
            subject=name,
        )
        for i, name in enumerate(NAMES)
    ]
    return records[:N_FORGET], records[N_FORGET:]


def memorised_model() -> dict[str, Any]:
    """A tiny Llama trained on forget + retain until it knows the answers (the unlearning target)."""
    forget, retain = make_records()
    texts = [f"{r.question} {r.answer}" for r in forget + retain]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    spec = TinyModelSpec(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_positions=128, vocab_size=400, seed=SEED
    )
    model = build_tiny_llama(spec, tokenizer)
    train = TrainSpec(
        steps=150, batch_size=8, lr=3e-3, weight_decay=0.0, warmup_steps=10, max_length=MAX_LENGTH, grad_clip=1.0,
        seed=SEED, log_every=50,
    )  # fmt: skip
    train_answers(model, tokenizer, forget + retain, train, progress=False)
    model.eval()
    return {"model": model, "tokenizer": tokenizer, "forget": forget, "retain": retain}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: these matmuls are too small to gain from more, and on a shared 2-core box
    two spinning OpenMP threads per process made the module 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(single_thread) -> dict[str, Any]:
    return memorised_model()


def mean_nll(model: torch.nn.Module, tokenizer: Any, records: list[QARecord]) -> float:
    pairs = [(r.question, r.answer) for r in records]
    nlls = answer_nlls(model, tokenizer, pairs, batch_size=16, max_length=MAX_LENGTH)
    return sum(nlls) / len(nlls)


def mean_rouge(model: torch.nn.Module, tokenizer: Any, records: list[QARecord]) -> float:
    """Greedy answers' ROUGE-L recall against the gold answers (the issue's acceptance metric)."""
    answers = generate_answers(model, tokenizer, [r.question for r in records], max_new_tokens=24, batch_size=8)
    scores = rouge_l_recall(answers, [r.answer for r in records])
    return sum(scores) / len(scores)


def run(trained: Mapping[str, Any], name: str, params: Mapping[str, Any]):
    t = trained
    return get_method(name).unlearn(t["model"], t["tokenizer"], t["forget"], t["retain"], params)


def test_the_target_model_has_memorised_its_facts(trained):
    assert mean_nll(trained["model"], trained["tokenizer"], trained["forget"]) < 0.3
    assert mean_nll(trained["model"], trained["tokenizer"], trained["retain"]) < 0.3


def test_every_baseline_has_params_here():
    assert set(BASELINES) == set(PARAMS)


@pytest.mark.parametrize("name", BASELINES)
def test_method_forgets_without_touching_the_caller_and_replays(trained, name):
    model, tokenizer = trained["model"], trained["tokenizer"]
    before = model_sha256(model)
    nll_before = mean_nll(model, tokenizer, trained["forget"])

    first = run(trained, name, PARAMS[name])
    second = run(trained, name, PARAMS[name])

    assert model_sha256(model) == before, "the caller's model was modified"
    assert first.model is not model
    nll_after = mean_nll(first.model, tokenizer, trained["forget"])
    assert nll_after > nll_before + 0.2, f"{name}: forget NLL {nll_before:.3f} -> {nll_after:.3f}"
    assert mean_rouge(first.model, tokenizer, trained["forget"]) < mean_rouge(model, tokenizer, trained["forget"])
    assert model_sha256(first.model) == model_sha256(second.model), "same seed, different weights"
    for key in ("unlearn_s", "peak_mem_mb", "steps"):
        assert key in first.stats, f"{name}: stats lack {key}"
    assert first.stats["unlearn_s"] > 0


def test_zerounlearn_gradient_variant_forgets(trained):
    model, tokenizer = trained["model"], trained["tokenizer"]
    nll_before = mean_nll(model, tokenizer, trained["forget"])
    result = run(trained, "zerounlearn", GRADIENT_VARIANT)
    assert result.stats["null_space_dim"] > 0
    assert mean_nll(result.model, tokenizer, trained["forget"]) > nll_before + 0.2


def test_rmu_updates_only_the_chosen_parameters(trained):
    params = {**PARAMS["rmu"], "update_layers": [1], "param_regex": r"mlp\.down_proj\.weight"}
    result = run(trained, "rmu", params)
    original = dict(trained["model"].named_parameters())
    changed = {name for name, p in result.model.named_parameters() if not torch.equal(p, original[name])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}


def test_grin_changes_only_the_selected_weights(trained):
    result = run(trained, "grin", PARAMS["grin"])
    masks = result.artifacts["weight_mask"]
    original = dict(trained["model"].named_parameters())
    for name, p in result.model.named_parameters():
        if name in masks:
            assert torch.equal(p[~masks[name]], original[name][~masks[name]]), name
        else:
            assert torch.equal(p, original[name]), name
    assert result.stats["selected_weights"] == sum(int(m.sum()) for m in masks.values())


def test_in_place_edits_the_given_model(trained):
    model = copy.deepcopy(trained["model"])
    result = get_method("ga").unlearn(
        model, trained["tokenizer"], trained["forget"], trained["retain"], {**PARAMS["ga"], "in_place": True}
    )
    assert result.model is model


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(KeyError, match="known methods: .*graddiff.*npo"):
        get_method("nope")


@pytest.mark.parametrize("name", BASELINES)
def test_missing_param_names_method_and_key(trained, name):
    key = "seed"
    params = {k: v for k, v in PARAMS[name].items() if k != key}
    with pytest.raises(KeyError, match=f"{name}.*'{key}'"):
        run(trained, name, params)


def test_missing_method_specific_param_is_named(trained):
    params = {k: v for k, v in PARAMS["npo"].items() if k != "beta"}
    with pytest.raises(KeyError, match="npo.*'beta'"):
        run(trained, "npo", params)
