"""Where a request's time goes: ``python -m bench.request_profile --profile default``.

One request (the profile's forget split, ``--no-evaluate``'s scope) runs in this process under cProfile,
on a scratch outputs folder that links the profile's models and splits (so it is a first request and
the profile's deployed state is never touched), and with a fresh MLflow store. The first call in a
process is the cold one a fresh `codeunlearn forget` pays. Writes
``bench/results/<profile>/request_profile.json`` whole: the request's ``request_s`` (inflated by the
profiler) and the cumulative seconds of the parts named in ``PARTS``, stamped with commit, machine, load.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

from bench.run import stamp
from codeunlearn.io import write_json
from tasks.context import PARAMS_FILE, REPO_ROOT, RunContext, make_context

# (file suffix, function name) -> what it is: the request's tasks and the heavy steps inside them.
PARTS = {
    ("tasks/request.py", "load_request"): "load_request task",
    ("tasks/request.py", "unlearn_request"): "unlearn_request task",
    ("tasks/common.py", "load_role"): "loading the base model (its needed blocks) and tokenizer",
    ("codeunlearn/methods/base.py", "unlearn"): "the method call",
    ("codeunlearn/methods/codeunlearn/counting.py", "_forward"): "the forget set's forward pass",
    ("torch/nn/modules/linear.py", "forward"): "of which linear layers",
    ("tasks/request.py", "register_request"): "register_request task",
    ("tasks/request.py", "check_request_file"): "validation before tracking (outside request_s)",
}


def scratch_params(ctx: RunContext, root: Path) -> Path:
    outputs = root / "outputs" / ctx.profile
    outputs.mkdir(parents=True)
    for shared in ("models", "splits"):
        (outputs / shared).symlink_to(ctx.stage_dir(shared), target_is_directory=True)
    settings = yaml.safe_load(PARAMS_FILE.read_text())
    settings["defaults"]["paths"]["outputs"] = str(root / "outputs")
    settings["defaults"]["tracking"]["artifact_root"] = str(root / "mlruns")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(settings, sort_keys=False))
    return params


def part_seconds(stats: pstats.Stats) -> dict[str, float]:
    seconds = dict.fromkeys(PARTS.values(), 0.0)
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for (suffix, name), label in PARTS.items():
            if function == name and filename.endswith(suffix):
                seconds[label] += cumulative
    return seconds


def measure(ctx: RunContext) -> dict[str, Any]:
    from flows.request import unlearn

    with tempfile.TemporaryDirectory(prefix="codeunlearn-profile-") as scratch:
        root = Path(scratch)
        params = scratch_params(ctx, root)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        MlflowClient().search_experiments()  # the store's schema is made here, outside the request
        profiler = cProfile.Profile()
        profiler.enable()
        result = unlearn(
            forget_file=str(ctx.stage_dir("splits") / "forget.jsonl"),
            profile=ctx.profile,
            params_file=str(params),
            evaluate=False,
        )
        profiler.disable()
    return stamp(
        ctx,
        {
            "what": "one cold in-process request under cProfile: cumulative seconds of its parts",
            "request_s_profiled": result["timing_s"]["request_s"],
            "control_statistics": result["unlearn"].get("control_statistics"),
            "parts_s": part_seconds(pstats.Stats(profiler)),
        },
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    args = parser.parse_args(argv)
    ctx = make_context(args.profile)
    payload = measure(ctx)
    write_json(REPO_ROOT / "bench" / "results" / ctx.profile / "request_profile.json", payload)
    print(json.dumps({k: payload[k] for k in ("request_s_profiled", "parts_s")}, indent=2))


if __name__ == "__main__":
    main()
