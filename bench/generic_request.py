"""A request from outside TOFU, as a user would make it: ``python -m bench.generic_request --profile default``.

The forget file is a set of real-world QAs about one subject that the target knows, the retain file
its neighbours (related subjects), both in the generic JSONL format (``bench.generic_request`` in
params.yaml names them). The command runs ``codeunlearn forget --forget-file F --retain-file R`` in a
fresh process against the profile's trained models, in a scratch copy of the profile's outputs (the
models are linked, not copied; the request, its deployed mask and its MLflow runs stay in the scratch
folder, so the profile's deployed state is never changed and a rerun starts from the same model).

Writes ``bench/results/<profile>/generic_request.json`` whole: forget ROUGE, held-out neighbour ROUGE
and model utility before and after, their ratios against issue 20's bars (forget <= 0.3x before,
neighbours >= 0.9x, utility >= 0.95x), the audit outcome, stamped with the commit, machine and load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.run import MEASURED_COMMIT, machine
from codeunlearn.config import load_settings, profile_outputs
from codeunlearn.io import read_json, write_json
from tasks.context import PARAMS_FILE, REPO_ROOT

# Issue 20's bars: after / before of each figure.
BARS = {"forget_rouge": ("le", 0.3), "neighbour_rouge": ("ge", 0.9), "model_utility": ("ge", 0.95)}
REQUESTS = "requests"


def scratch_outputs(profile_dir: Path, scratch: Path) -> Path:
    """``scratch/<profile>`` holding a link to every entry of the profile's outputs but its requests."""
    target = scratch / profile_dir.name
    target.mkdir(parents=True)
    for entry in profile_dir.iterdir():
        if entry.name != REQUESTS:
            (target / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return target


def scratch_params(scratch: Path) -> Path:
    """params.yaml with the outputs in ``scratch`` (relative data paths still resolve from the repository)."""
    params = yaml.safe_load(PARAMS_FILE.read_text())
    params["defaults"]["paths"]["outputs"] = str(scratch)
    path = scratch / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_fresh(command: list[str], scratch: Path, what: str) -> tuple[str, float]:
    """A fresh process of this Python in the repository, MLflow in ``scratch``; its stdout and wall time."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *command], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False
    )
    wall_s = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{what} exited {result.returncode}:\n{result.stderr[-4000:]}")
    print(f"{what}: {wall_s:.1f} s", flush=True)
    return result.stdout, wall_s


def printed_result(stdout: str) -> dict[str, Any]:
    """The JSON `codeunlearn forget` prints after its logs."""
    return json.loads(stdout[stdout.index("{") :])


def write_result(profile: str, name: str, payload: dict[str, Any]) -> None:
    """``bench/results/<profile>/<name>.json``, whole, and its before/after figures and ratios printed."""
    write_json(REPO_ROOT / "bench" / "results" / profile / f"{name}.json", payload)
    shown = {k: v for k, v in payload.items() if k.endswith(("_before", "_after")) or k == "ratios"}
    print(json.dumps(shown, indent=2))


def run_request(profile: str, files: dict[str, Any], scratch: Path) -> tuple[dict, float]:
    """One fresh `codeunlearn forget` process; its printed result and wall time."""
    command = [
        "-m", "flows.cli", "forget",
        "--forget-file", str(REPO_ROOT / files["forget_file"]),
        "--retain-file", str(REPO_ROOT / files["retain_file"]),
        "--method", files["method"], "--profile", profile, "--params", str(scratch_params(scratch)),
    ]  # fmt: skip
    stdout, wall_s = run_fresh(command, scratch, "`codeunlearn forget`")
    return printed_result(stdout), wall_s


def ratios(
    before: dict[str, float], after: dict[str, float], bars: dict[str, tuple[str, float]] = BARS
) -> dict[str, Any]:
    """after / before of each barred figure, and whether it meets its bar."""
    out: dict[str, Any] = {}
    for key, (direction, bar) in bars.items():
        ratio = after[key] / before[key] if before[key] else None
        met = ratio is not None and (ratio <= bar if direction == "le" else ratio >= bar)
        out[key] = {"ratio": ratio, "bar": f"{'<=' if direction == 'le' else '>='} {bar}x before", "met": met}
    return out


def measure(profile: str) -> dict[str, Any]:
    settings = load_settings(PARAMS_FILE, profile)
    files = settings["bench"]["generic_request"]
    profile_dir = profile_outputs(settings, REPO_ROOT)
    if not (profile_dir / "models" / "codebook").is_dir():
        raise SystemExit(f"{profile_dir}: no trained models; run `python -m flows.pipeline --profile {profile}` first")
    with tempfile.TemporaryDirectory(prefix="codeunlearn-generic-") as tmp:
        scratch = Path(tmp)
        out_dir = scratch_outputs(profile_dir, scratch)
        result, wall_s = run_request(profile, files, scratch)
        request_dir = out_dir / REQUESTS / result["request_id"]
        audit = read_json(request_dir / "audit.json")
    before, after = result["metrics"]["before"], result["metrics"]["after"]
    figures = {f"{key}_{when}": values[key] for key in BARS for when, values in (("before", before), ("after", after))}
    return {
        "what": "a real-world QA request (one subject the target knows) with a neighbour set, via `codeunlearn forget`",
        "files": files,
        **figures,
        "ratios": ratios(before, after),
        "all_bars_met": all(item["met"] for item in ratios(before, after).values()),
        "neighbour_prob_before": before.get("neighbour_prob"),
        "neighbour_prob_after": after.get("neighbour_prob"),
        "audit_outcome": audit["verdict"].get("outcome"),
        "audit_passed": audit["verdict"].get("passed"),
        "codes_disabled": result["unlearn"].get("disabled_codes"),
        "cli_wall_s": wall_s,
        "profile": profile,
        "machine": machine(),
        "git_commit": MEASURED_COMMIT,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()
    write_result(args.profile, "generic_request", measure(args.profile))


if __name__ == "__main__":
    main()
