"""Real processes, really killed, and every store searched: the smoke pipeline SIGKILLed (its whole process
group) mid codebook training and mid checkpoint write ends as an uninterrupted run does, and no forget
question or answer reaches MLflow, Prefect, the logs or the report unless ``tracking.log_raw_text``.

The same functions as ``python -m bench.reliability`` (which records the outcome in
bench/results/smoke/reliability.json).
"""

from __future__ import annotations

import pytest

from bench import reliability
from tasks.stages import PIPELINE
from tests.conftest import SHARED_DATA

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SHARED_DATA / "tofu").exists(), reason="needs ../shared/data/tofu"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted smoke pipeline in its own process, Prefect home and MLflow store, with what it
    ended with and the default privacy search taken at once: the opt-in request later adds to its stores."""
    run = reliability.reference_run(tmp_path_factory.mktemp("reference"))
    records = reliability.forget_records(run)
    return {
        "run": run,
        "records": records,
        "outcome": reliability.run_outcome(run),
        "default_hits": reliability.privacy_hits(run, records),
        "stores": [str(path.relative_to(run.root)) for path in reliability.privacy_stores(run)],
    }


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> dict:
    return reliability.crash_run(tmp_path_factory.mktemp("crashed"))


def test_a_run_sigkilled_in_training_and_in_a_checkpoint_write_ends_as_an_uninterrupted_one(reference, crashed):
    order = list(PIPELINE)
    before_codebook = order[: order.index("train_codebook")]
    # Killed in codebook training: every earlier stage had finished, the codebook had not.
    assert crashed["killed_at_step"] > 0
    assert crashed["markers_after_training_kill"] == sorted(before_codebook)
    # Killed in the checkpoint write: the half-written file stayed in the writer's scratch directory ...
    assert any(path.startswith("models/.codebook.tmp.") for path in crashed["half_written"]), crashed
    # ... which the resumed run never read: it reused the finished stages untouched, removed the dead
    # run's scratch space and ended with the same mask, codebook, registry and metrics.
    assert crashed["reused_stages"] == sorted(before_codebook)
    assert crashed["scratch_left"] == []
    expected = reference["outcome"]
    actual = reliability.run_outcome(crashed["run"])
    assert reliability.differences(expected, actual) == []
    assert expected["mask_ids"] and expected["registered_versions"]["codeunlearn-smoke-codebook"] == [1]


def test_no_forget_question_or_answer_reaches_any_store(reference):
    stores = reference["stores"]
    # The search covers each kind of store (a vacuous search would pass too).
    assert "mlflow.db" in stores and "reference.log" in stores
    assert any(s.startswith("mlruns/") for s in stores) and any(s.startswith("outputs/smoke/report/") for s in stores)
    assert any(s.startswith("prefect/") and s.endswith(".db") for s in stores)
    assert len(reliability.needles(reference["records"])) > 0
    assert reference["default_hits"] == []


def test_the_search_finds_forget_text_a_request_logs_on_purpose(reference):
    """``tracking.log_raw_text: true`` logs the request's file: the same search must find it."""
    hits = reliability.opt_in_hits(reference["run"], reference["records"][:8])
    assert hits and any(store.startswith("mlruns/") for store, _ in hits)
