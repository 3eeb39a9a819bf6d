"""Each stage's Prefect task by name, in ``tasks.stages`` order: what the flows and ``python -m flows.stage``
(DVC's entry point) run. The tasks layer never imports it, so no stage module imports another.
"""

from __future__ import annotations

from tasks.evaluate import evaluate
from tasks.models import base_model, finetune_oracle, finetune_target, train_codebook_stage
from tasks.prepare_data import prepare_data
from tasks.report import report, studies_report
from tasks.sequential import sequential
from tasks.stages import STAGES
from tasks.sweep import sweep
from tasks.unlearn import select_codes
from tasks.validate import validate_forget_set

TASKS = {
    "prepare_data": prepare_data,
    "validate_forget_set": validate_forget_set,
    "base_model": base_model,
    "finetune_target": finetune_target,
    "finetune_oracle": finetune_oracle,
    "train_codebook": train_codebook_stage,
    "select_codes": select_codes,
    "evaluate": evaluate,
    "report": report,
    "sweep": sweep,
    "sequential": sequential,
    "studies_report": studies_report,
}
if tuple(TASKS) != STAGES:
    raise RuntimeError(f"flows.registry names {tuple(TASKS)}, tasks.stages orders {STAGES}")
