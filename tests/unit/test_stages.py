"""The stage lists the flows run are the stages dvc.yaml declares, the main job never waits on a study, and
no task module imports another."""

from __future__ import annotations

import ast

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


# What every task module may import (docs/architecture.md, "tasks/"); none of them imports a task module.
SHARED_TASK_MODULES = {"context", "tracking", "resume", "common", "stages"}


def task_imports(path) -> set[str]:
    """The ``tasks`` modules a file imports, by name (``from tasks import x``, ``from tasks.x import y``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "tasks":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasks."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tasks.")}
    return names


def test_no_task_module_imports_another_and_the_shared_modules_import_no_task_module():
    modules = {path.stem: path for path in (REPO_ROOT / "tasks").glob("*.py") if path.stem != "__init__"}
    assert SHARED_TASK_MODULES <= set(modules)
    for name, path in modules.items():
        imported = task_imports(path) - {name}
        assert imported <= SHARED_TASK_MODULES, f"tasks/{name}.py imports {sorted(imported - SHARED_TASK_MODULES)}"
    assert task_imports(modules["stages"]) == set()  # plain data
