"""The stages in order, by name: plain data the flows, DVC (``tests/test_stages.py`` checks dvc.yaml),
the resume fingerprints and the CLI share. ``flows.registry`` maps each name to its Prefect task.
It imports nothing: the shared modules (``resume``) read it as the flows do.

``PIPELINE`` is the main job (``flows.pipeline``): one unlearning request, trained, applied, measured
and reported. ``STUDIES`` (``flows.studies``) vary that request (the S' frontier, sequential and
growing requests) on the main job's codebook and splits, and report on their own, so the main job never
waits for them.
"""

from __future__ import annotations

PIPELINE = (
    "prepare_data",
    "validate_forget_set",
    "base_model",
    "finetune_target",
    "finetune_oracle",
    "train_codebook",
    "select_codes",
    "evaluate",
    "report",
)
# Stages that may run at once, each in its own process (``side_by_side`` in params.yaml).
SIDE_BY_SIDE = ("finetune_target", "finetune_oracle")
# The main-job stages the studies read (splits and codebook): the studies flow resumes them, so a
# finished main job is reused as it is, and the studies never need its evaluation.
STUDY_INPUTS = ("prepare_data", "validate_forget_set", "base_model", "finetune_target", "train_codebook")
STUDIES = ("sweep", "sequential", "studies_report")
STAGES = PIPELINE + STUDIES
# The module holding each stage's task (``tests/test_stages.py`` checks it against ``flows.registry``):
# its source and the project modules it imports are part of the stage's fingerprint and DVC deps.
STAGE_MODULES = {
    "prepare_data": "tasks.prepare_data",
    "validate_forget_set": "tasks.validate",
    "base_model": "tasks.models",
    "finetune_target": "tasks.models",
    "finetune_oracle": "tasks.models",
    "train_codebook": "tasks.models",
    "select_codes": "tasks.unlearn",
    "evaluate": "tasks.evaluate",
    "report": "tasks.report",
    "sweep": "tasks.sweep",
    "sequential": "tasks.sequential",
    "studies_report": "tasks.report",
}


def upstream(stage: str) -> tuple[str, ...]:
    """The stages whose outputs ``stage`` may read: every main-job stage before it; a study reads the
    ``STUDY_INPUTS`` and the studies before it."""
    if stage in PIPELINE:
        return PIPELINE[: PIPELINE.index(stage)]
    return STUDY_INPUTS + STUDIES[: STUDIES.index(stage)]


def stage_groups(settings: dict) -> list[tuple[str, ...]]:
    """The main job in order, as groups of stages that run together: ``SIDE_BY_SIDE`` is one group when
    ``side_by_side.enabled``, every other stage a group of its own."""
    together = settings["side_by_side"]["enabled"]
    groups: list[tuple[str, ...]] = []
    for name in PIPELINE:
        if together and name in SIDE_BY_SIDE:
            if name == SIDE_BY_SIDE[0]:
                groups.append(SIDE_BY_SIDE)
        else:
            groups.append((name,))
    return groups
