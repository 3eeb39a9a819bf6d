"""The stage lists the flows run are the stages dvc.yaml declares, and the main job never waits on a study."""

from __future__ import annotations

import yaml

from tasks.stages import PIPELINE, STAGES, STUDIES, STUDY_INPUTS
from tests.conftest import REPO_ROOT


def dvc_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def test_dvc_declares_every_stage_the_flows_run_and_each_runs_its_own_task():
    stages = dvc_stages()
    assert set(stages) == set(STAGES)
    for name, body in stages.items():
        assert body["cmd"] == f"python -m flows.stage {name}", name


def test_no_main_job_stage_depends_on_a_study_output():
    stages = dvc_stages()
    study_outputs = {
        (next(iter(out)) if isinstance(out, dict) else out)
        for name in STUDIES
        for key in ("outs", "plots")
        for out in stages[name].get(key, [])
    }
    for name in PIPELINE:
        deps = set(stages[name].get("deps", []))
        assert not deps & study_outputs, name


def test_the_studies_read_only_main_job_stages_that_precede_evaluation():
    order = list(PIPELINE)
    assert set(STUDY_INPUTS) <= set(order)
    assert all(order.index(name) < order.index("evaluate") for name in STUDY_INPUTS)
    assert list(STAGES) == [*PIPELINE, *STUDIES]


def test_each_stage_module_is_the_module_of_its_registered_task():
    from flows.registry import TASKS
    from tasks.stages import STAGE_MODULES

    assert {name: task.fn.__module__ for name, task in TASKS.items()} == STAGE_MODULES


def test_dvc_watches_exactly_the_code_files_the_fingerprints_hash():
    """``python -m tasks.resume --dvc-deps`` regenerates dvc.yaml's code deps when this fails."""
    from tasks.resume import dvc_code_deps

    for name, body in dvc_stages().items():
        code = [dep for dep in body["deps"] if dep.startswith(("codeunlearn/", "tasks/"))]
        assert code == dvc_code_deps(name), name
