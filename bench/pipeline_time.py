"""The main job's wall time from a fresh clone: `python -m bench.pipeline_time --clone /tmp/fresh`.

Clones this repository's HEAD into ``<clone>/main`` with ``../shared`` beside it (a link to this
checkout's), then runs, one after another and exactly as the README writes them:

- ``setup``: ``bash scripts/setup.sh`` (timed apart: the budget is the main job's);
- ``default``: ``.venv/bin/python -m flows.pipeline --profile default`` (the main job);
- ``default_studies``: ``.venv/bin/python -m flows.studies --profile default``;
- ``smoke`` and ``smoke_studies``: the same two flows on the smoke profile (the integration test's).

Each part records its wall time, the CPU seconds of its own process tree and of everything else on the
machine over the same interval (``other_cpu_s``: how idle the machine really was) and the 1-minute load
average sampled every few seconds. The main job's stage times come from the clone's stage markers, and
its headline metrics (``HEADLINE``, per model) from the clone's ``eval/metrics.json``, so that a faster
pipeline is seen to give the same numbers. Writes ``bench/results/default/pipeline.json`` whole,
stamped with the commit, the machine and the load.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.run import machine
from codeunlearn.io import read_json, write_json
from tasks.context import REPO_ROOT, git_commit

COMMANDS = {
    "setup": "bash scripts/setup.sh",
    "default": ".venv/bin/python -m flows.pipeline --profile default",
    "default_studies": ".venv/bin/python -m flows.studies --profile default",
    "smoke": ".venv/bin/python -m flows.pipeline --profile smoke",
    "smoke_studies": ".venv/bin/python -m flows.studies --profile smoke",
}
BUDGET_S = {"default": 1800.0, "smoke": 300.0}  # issue 18: the main job <= 30 min, the smoke flow <= 5 min
LOAD_SAMPLE_S = 5.0
HEADLINE = ("forget_rouge", "retain_rouge", "model_utility", "forget_quality")
OUT = REPO_ROOT / "bench" / "results" / "default" / "pipeline.json"


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy (not idle or waiting on I/O) since boot."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadSampler:
    """The 1-minute load average every ``LOAD_SAMPLE_S`` seconds while a part runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(LOAD_SAMPLE_S):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_part(name: str, workdir: Path, logs: Path) -> dict[str, Any]:
    """Run one README command in ``workdir``; its wall time, CPU split and load; raises if it fails."""
    log_path = logs / f"{name}.log"
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_before, load_before = busy_cpu_s(), os.getloadavg()[0]
    started = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {COMMANDS[name]}", flush=True)
    with LoadSampler() as sampler, log_path.open("w") as log:
        done = subprocess.run(COMMANDS[name], shell=True, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    wall_s = time.perf_counter() - started
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_cpu_s = (after_children.ru_utime - before_children.ru_utime) + (
        after_children.ru_stime - before_children.ru_stime
    )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed (exit {done.returncode}); see {log_path}")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {wall_s:.0f} s", flush=True)
    return {
        "command": COMMANDS[name],
        "wall_s": wall_s,
        "own_cpu_s": own_cpu_s,
        "other_cpu_s": max(0.0, busy_cpu_s() - busy_before - own_cpu_s),
        "load_average_1m_before": load_before,
        "load_average_1m_mean": statistics.fmean(sampler.samples) if sampler.samples else None,
        "load_average_1m_max": max(sampler.samples) if sampler.samples else None,
    }


def stage_times(workdir: Path, profile: str) -> dict[str, float]:
    """Each stage's wall time as its marker recorded it (tasks.resume), in run order."""
    markers = workdir / "data" / "outputs" / profile / ".stages"
    times = {path.stem: read_json(path)["wall_s"] for path in markers.glob("*.json")}
    return dict(sorted(times.items(), key=lambda item: path_order(markers / f"{item[0]}.json")))


def headline_metrics(workdir: Path, profile: str) -> dict[str, dict[str, float]]:
    """Per model, the ``HEADLINE`` numbers of the profile's evaluation as the run wrote them."""
    metrics = read_json(workdir / "data" / "outputs" / profile / "eval" / "metrics.json")
    return {model: {key: row[key] for key in HEADLINE if key in row} for model, row in metrics.items()}


def path_order(path: Path) -> int:
    return path.stat().st_mtime_ns


def fresh_clone(clone: Path) -> Path:
    """``<clone>/main``: this repository's HEAD, with ``<clone>/shared`` pointing at the data beside it."""
    if clone.exists():
        raise SystemExit(f"{clone} exists: the measurement needs a fresh clone")
    clone.mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone / "main")], check=True)
    (clone / "shared").symlink_to((REPO_ROOT.parent / "shared").resolve(), target_is_directory=True)
    return clone / "main"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_time", description=__doc__)
    parser.add_argument("--clone", type=Path, required=True, help="a directory that does not exist yet")
    parser.add_argument("--parts", nargs="+", default=list(COMMANDS), choices=list(COMMANDS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.parts[0] != "setup":
        raise SystemExit("the first part must be setup: a fresh clone has no environment")
    workdir = fresh_clone(args.clone)
    logs = args.clone / "logs"
    logs.mkdir()
    parts = {name: run_part(name, workdir, logs) for name in args.parts}
    payload: dict[str, Any] = {
        "git_commit": git_commit(workdir),
        "machine": machine(),
        "parts": parts,
        "budget_s": BUDGET_S,
    }
    for profile in ("default", "smoke"):
        if profile in parts:
            payload[f"{profile}_e2e_s"] = parts[profile]["wall_s"]
            payload[f"{profile}_stage_s"] = stage_times(workdir, profile)
            payload[f"{profile}_metrics"] = headline_metrics(workdir, profile)
            payload[f"{profile}_within_budget"] = parts[profile]["wall_s"] <= BUDGET_S[profile]
        if f"{profile}_studies" in parts:
            payload[f"{profile}_studies_s"] = parts[f"{profile}_studies"]["wall_s"]
    payload["setup_s"] = parts["setup"]["wall_s"]
    write_json(args.out, payload)
    print(args.out)


if __name__ == "__main__":
    main()
