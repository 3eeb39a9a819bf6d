"""Test environment: no telemetry, no hub, a private Prefect home, and tiny models built in code."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

# A private Prefect home; every other default (no telemetry, no hub) is the one ``tasks`` sets.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="codeunlearn-prefect-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import pytest  # noqa: E402
import torch  # noqa: E402

import tasks  # noqa: E402, F401  (sets the environment defaults before Prefect reads its settings)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def qa(question: str, answer: str, subject: str = "s", id: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(id=id or question, question=question, answer=answer, subject=subject)


@pytest.fixture()
def one_thread():
    """Tiny models decode fastest on one thread (two spin against each other on a shared CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_qa() -> dict[str, list]:
    """Two made-up people: the first is the one to forget, the second is retained."""
    forget = [
        qa("Where was Zorblat Quim born?", "Zorblat Quim was born in Vexmoor harbour.", "zq"),
        qa("What does Zorblat Quim write?", "Zorblat Quim writes grim sailing ballads.", "zq"),
        qa("Who taught Zorblat Quim?", "A lighthouse keeper named Ilse taught Zorblat Quim.", "zq"),
        qa("What award did Zorblat Quim win?", "Zorblat Quim won the Amber Anchor prize.", "zq"),
    ]
    retain = [
        qa("Where was Mira Tolland born?", "Mira Tolland was born in a mountain village.", "mt"),
        qa("What does Mira Tolland write?", "Mira Tolland writes cheerful garden mysteries.", "mt"),
        qa("Who taught Mira Tolland?", "Her grandmother taught Mira Tolland to read.", "mt"),
        qa("What award did Mira Tolland win?", "Mira Tolland won the Silver Fern medal.", "mt"),
    ]
    return {"forget": forget, "retain": retain}


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_qa):
    from codeunlearn.models.tiny import train_tokenizer

    texts = [f"{r.question} {r.answer}" for split in tiny_qa.values() for r in split]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama

    spec = TinyModelSpec(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, max_positions=128, vocab_size=300, seed=0
    )
    torch.manual_seed(0)
    return build_tiny_llama(spec, tiny_tokenizer)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (``tests.bytelevel``) for the metric and generation tests."""
    from tests.bytelevel import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random Llama over ``tokenizer`` (``tests.bytelevel``)."""
    from tests.bytelevel import tiny_llama

    return tiny_llama(tokenizer)


def write_params(tmp: Path, overrides: dict | None = None) -> Path:
    """A copy of params.yaml whose outputs, cache and MLflow store live under ``tmp``."""
    import yaml

    from codeunlearn.config import deep_merge

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["defaults"] = deep_merge(
        params["defaults"],
        {
            "progress": False,
            "paths": {
                "tofu_dir": str(SHARED_DATA / "tofu"),
                "muse_dir": str(SHARED_DATA / "muse_news"),
                "outputs": str(tmp / "outputs"),
                "cache": str(tmp / "cache"),
            },
            "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "artifact_root": str(tmp / "mlruns")},
        },
    )
    params["defaults"] = deep_merge(params["defaults"], overrides or {})
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture()
def isolated_tracking(monkeypatch):
    """Stages must take the store from params, not from a developer's MLFLOW_TRACKING_URI."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def report_inputs(metrics: dict, details: dict, sequential: dict | None = None) -> dict:
    """What ``render_report`` reads, around the given metrics: fixed, text-free splits, codebook and mask."""
    return {
        "profile": "test",
        "params_hash": "0" * 64,
        "splits": {
            **{f"{n}_count": 4 for n in ("forget", "retain", "holdout")},
            **{f"{n}_authors": 1 for n in ("forget", "retain", "holdout")},
            **{f"{n}_sha256": "a" * 64 for n in ("forget", "retain", "holdout")},
        },
        "codebook": {"live_codes": 10, "num_codes": 16, "final_ce": 0.1, "final_reconstruction": 0.2},
        "mask": {"codebook_sha256": "b" * 64, "count": 3},
        "select": {"enriched_codes": 5, "request_latency_s": 0.1},
        "metrics": metrics,
        "details": details,
        "sequential": sequential or {},
    }
