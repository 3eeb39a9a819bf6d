"""The pipeline's stages in order, by name: the one list the flow, DVC and the CLI share."""

from __future__ import annotations

from tasks.evaluate import evaluate
from tasks.models import base_model, finetune_oracle, finetune_target, train_codebook_stage
from tasks.prepare_data import prepare_data
from tasks.report import report
from tasks.sequential import sequential
from tasks.sweep import sweep
from tasks.unlearn import select_codes
from tasks.validate import validate_forget_set

PIPELINE = {
    "prepare_data": prepare_data,
    "validate_forget_set": validate_forget_set,
    "base_model": base_model,
    "finetune_target": finetune_target,
    "finetune_oracle": finetune_oracle,
    "train_codebook": train_codebook_stage,
    "select_codes": select_codes,
    "evaluate": evaluate,
    "sweep": sweep,
    "sequential": sequential,
    "report": report,
}
