"""Reliability, measured on real processes: ``python -m bench.reliability``.

- ``crash_equal``: the smoke pipeline, killed with SIGKILL (its whole process group) in the middle of
  codebook training, then again in the middle of writing the codebook checkpoint, then run to the end,
  ends with the same mask ids, codebook sha256, registered model versions and metrics as an
  uninterrupted run, and leaves no scratch file behind.
- ``privacy_hits``: every forget question and answer, raw and as JSON escapes it, searched as bytes in
  the MLflow store (mlflow.db, mlruns/), the Prefect database, the runs' log files and the report:
  ``default`` (must be 0) and ``opt_in``, after a request with ``tracking.log_raw_text: true`` (> 0:
  the search finds text when it is there).
- ``rejection_s``: `codeunlearn forget` refusing each bad input (``bench.rejection``), median of 3,
  plus a forget file that overlaps the profile's retain split.

``tests/integration/test_crash_and_privacy.py`` runs the same functions. Writes
``bench/results/smoke/reliability.json`` whole, stamped with the commit, the machine and the load.
``python -m bench.reliability child ...`` is the flow process the harness starts and kills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from codeunlearn.config import deep_merge
from codeunlearn.io import read_json, sha256_file, write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PROFILE = "smoke"
# Generous: the smoke flow takes ~200 s on two idle cores, and CI's cores are shared.
RUN_TIMEOUT_S = 1800
POLL_S = 0.2
# Where in codebook training the kill lands: a fraction of its steps, read from its progress bar.
KILL_AT_FRACTION = 0.3
# Either codebook mode's bar: "codebook" (bottleneck) or "codebook (residual)".
CODEBOOK_BAR = re.compile(rb"codebook(?: \(residual\))?:\s+\d+%\|[^\r\n|]*\|\s*(\d+)/(\d+)")
# Shorter strings would match unrelated bytes by chance (TOFU's questions and answers are sentences).
MIN_NEEDLE_CHARS = 12
CRASH_SUMMARY = "crash.json"


# ------------------------------------------------------------------------------------- isolated runs


@dataclass(frozen=True)
class RunDir:
    """One isolated run: outputs, cache, MLflow store, Prefect home and log files all under ``root``."""

    root: Path

    @property
    def outputs(self) -> Path:
        return self.root / "outputs" / PROFILE

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def params(self, overrides: dict | None = None, name: str = "params.yaml") -> Path:
        """A copy of params.yaml with every path under ``root`` (and ``overrides`` on top)."""
        params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        isolated = {
            "progress": False,
            "paths": {
                "tofu_dir": str(SHARED_DATA / "tofu"),
                "muse_dir": str(SHARED_DATA / "muse_news"),
                "outputs": str(self.root / "outputs"),
                "cache": str(self.root / "cache"),
            },
            "tracking": {"uri": f"sqlite:///{self.root / 'mlflow.db'}", "artifact_root": str(self.root / "mlruns")},
        }
        params["defaults"] = deep_merge(deep_merge(params["defaults"], isolated), overrides or {})
        path = self.root / name
        self.root.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
        env.update(PREFECT_HOME=str(self.prefect_home), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        return env


def start_child(run: RunDir, log_name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """``python -m bench.reliability child ARGS`` in its own session (so a kill takes all its processes)."""
    run.root.mkdir(parents=True, exist_ok=True)
    log = run.root / log_name
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.reliability", "child", *args],
            cwd=REPO_ROOT,
            env=run.env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log


def log_tail(log: Path, chars: int = 4000) -> str:
    return log.read_bytes()[-chars:].decode("utf-8", "replace")


def run_child(run: RunDir, log_name: str, *args: str) -> None:
    process, log = start_child(run, log_name, *args)
    if process.wait(timeout=RUN_TIMEOUT_S) != 0:
        raise RuntimeError(f"{' '.join(args)} exited {process.returncode}; {log}:\n{log_tail(log)}")


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def kill_mid_codebook_training(run: RunDir, params: Path, log_name: str) -> int:
    """Start the pipeline and SIGKILL its process group once codebook training is ``KILL_AT_FRACTION``
    of the way; the step it died at."""
    process, log = start_child(run, log_name, "pipeline", "--params", str(params))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            ended = f"the run ended ({process.returncode}) before codebook training"
            raise RuntimeError(f"{ended}; {log}:\n{log_tail(log)}")
        steps = CODEBOOK_BAR.findall(log.read_bytes())
        if steps:
            done, total = (int(x) for x in steps[-1])
            if done >= KILL_AT_FRACTION * total:
                kill_group(process)
                return done
        time.sleep(POLL_S)
    kill_group(process)
    raise TimeoutError(f"codebook training never reached {KILL_AT_FRACTION:.0%}; {log}")


def scratch_files(outputs: Path) -> list[Path]:
    """What an atomic write leaves while in flight: hidden ``.NAME.*.tmp`` files and ``.NAME.tmp.*``/
    ``.NAME.old.*`` directories."""
    return sorted(p for p in outputs.rglob(".*") if re.search(r"\.(tmp|old)(\.|$)", p.name))


# -------------------------------------------------------------------------------------- comparisons


def run_outcome(run: RunDir) -> dict[str, Any]:
    """What a run must reproduce: mask ids, codebook sha256 (recorded and of the saved file), the
    registered model versions and every metric the evaluation wrote."""
    from mlflow import MlflowClient

    from codeunlearn.methods.codeunlearn.mask import load_mask

    out = run.outputs
    client = MlflowClient(tracking_uri=f"sqlite:///{run.root / 'mlflow.db'}")
    versions = {
        model.name: sorted(int(v.version) for v in client.search_model_versions(f"name = '{model.name}'"))
        for model in client.search_registered_models()
    }
    codebook_dir = out / "models" / "codebook"
    return {
        "mask_ids": list(load_mask(out / "mask").disabled_ids),
        # The tensors file (ids and scores); mask.json names the params file's hash, which differs by path.
        "mask_tensors_sha256": sha256_file(out / "mask" / "mask.safetensors"),
        "codebook_sha256": read_json(codebook_dir / "training.json")["codebook_sha256"],
        "codebook_file_sha256": sha256_file(codebook_dir / "codebook.safetensors"),
        "registered_versions": versions,
        "metrics": read_json(out / "eval" / "metrics.json"),
        "evaluate_result": read_json(run.root / "result.json")["evaluate"],
    }


def differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    return [key for key in expected if expected[key] != actual.get(key)]


# ---------------------------------------------------------------------------------------- the privacy search


def needles(records: list) -> list[bytes]:
    """Each question and answer as stored raw, and as a JSON writer escapes it (ASCII-only or not)."""
    found: set[bytes] = set()
    for record in records:
        for text in (record.question, record.answer):
            if len(text) < MIN_NEEDLE_CHARS:
                continue
            found.add(text.encode())
            found.add(json.dumps(text)[1:-1].encode())
            found.add(json.dumps(text, ensure_ascii=False)[1:-1].encode())
    return sorted(found)


def privacy_stores(run: RunDir) -> list[Path]:
    """Every store a run writes that must hold no forget text: the MLflow database (and its journal),
    mlruns/, the Prefect home (its database), the runs' log files and the report."""
    stores = [*run.root.glob("mlflow.db*"), *run.root.glob("*.log")]
    for folder in (run.root / "mlruns", run.prefect_home, run.outputs / "report"):
        stores.extend(p for p in folder.rglob("*") if p.is_file())
    return sorted(stores)


def privacy_hits(run: RunDir, records: list) -> list[tuple[str, str]]:
    """(store, needle) for every forget text found; the needle shortened, the store relative to the run."""
    wanted = needles(records)
    hits = []
    for store in privacy_stores(run):
        blob = store.read_bytes()
        hits.extend((str(store.relative_to(run.root)), n[:40].decode(errors="replace")) for n in wanted if n in blob)
    return hits


def forget_records(run: RunDir) -> list:
    from codeunlearn.data.records import read_jsonl_records

    return read_jsonl_records(run.outputs / "splits" / "forget.jsonl")


def write_request(folder: Path, records: list) -> Path:
    """A generic-JSONL request file of ``records``, outside every searched store."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "request.jsonl"
    path.write_text("".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------- scenarios


def reference_run(root: Path) -> RunDir:
    """The uninterrupted smoke pipeline every comparison and the default privacy search read (one that
    already finished in ``root``, e.g. a kept ``--work-dir``, is read as it is)."""
    run = RunDir(root)
    if not (root / "result.json").exists():
        run_child(run, "reference.log", "pipeline", "--params", str(run.params()))
    return run


def crash_run(root: Path) -> dict[str, Any]:
    """Kill mid-training, kill mid-checkpoint-write, then finish: what each step left and reused (a
    scenario that already finished in ``root``, e.g. a kept ``--work-dir``, is read as it is)."""
    run = RunDir(root)
    if (root / CRASH_SUMMARY).exists():
        return {"run": run, **read_json(root / CRASH_SUMMARY)}
    # The progress bars are the kill's clock; ``progress`` never enters a fingerprint or a result.
    params = run.params({"progress": True})
    killed_at_step = kill_mid_codebook_training(run, params, "killed-in-training.log")
    markers = run.outputs / ".stages"
    after_training_kill = sorted(p.stem for p in markers.glob("*.json"))
    process, log = start_child(run, "killed-in-checkpoint.log", "pipeline", "--params", str(params), "--die-in-write")
    process.wait(timeout=RUN_TIMEOUT_S)
    if process.returncode != -signal.SIGKILL:
        died = f"expected the checkpoint writer to die by SIGKILL, got {process.returncode}"
        raise RuntimeError(f"{died}:\n{log_tail(log)}")
    half_written = [str(p.relative_to(run.outputs)) for p in scratch_files(run.outputs)]
    kept = {p.stem: p.stat().st_mtime_ns for p in markers.glob("*.json")}
    run_child(run, "resumed.log", "pipeline", "--params", str(params))
    reused = sorted(name for name, stamp in kept.items() if (markers / f"{name}.json").stat().st_mtime_ns == stamp)
    summary = {
        "killed_at_step": killed_at_step,
        "markers_after_training_kill": after_training_kill,
        "half_written": half_written,
        "reused_stages": reused,
        "scratch_left": [str(p.relative_to(run.outputs)) for p in scratch_files(run.outputs)],
    }
    write_json(root / CRASH_SUMMARY, summary)
    return {"run": run, **summary}


def opt_in_hits(run: RunDir, records: list) -> list[tuple[str, str]]:
    """A request with ``tracking.log_raw_text: true`` on a finished run, then the same search."""
    request = write_request(run.root / "request-input", records)
    params = run.params({"tracking": {"log_raw_text": True}}, name="params-raw-text.yaml")
    run_child(run, "request-raw-text.log", "request", "--params", str(params), "--forget-file", str(request))
    return privacy_hits(run, records)


# ------------------------------------------------------------------------------------------- the child


def die_in_codebook_write() -> None:
    """Make the codebook checkpoint's writer die by SIGKILL half way through its file, as a power cut
    or the OOM killer would: the process group goes, no handler or ``finally`` runs."""
    from codeunlearn import checkpoints

    real = checkpoints.save_codebook

    def dying(bottleneck: Any, directory: Path) -> None:
        real(bottleneck, directory)
        victim = max((p for p in Path(directory).iterdir() if p.is_file()), key=lambda p: p.stat().st_size)
        with victim.open("r+b") as handle:
            handle.truncate(victim.stat().st_size // 2)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    checkpoints.save_codebook = dying


def child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability child")
    parser.add_argument("what", choices=["pipeline", "request"])
    parser.add_argument("--params", required=True)
    parser.add_argument("--forget-file")
    parser.add_argument("--die-in-write", action="store_true")
    args = parser.parse_args(argv)
    import tasks  # noqa: F401  (the environment defaults, before Prefect reads its settings)

    if args.die_in_write:
        die_in_codebook_write()
    if args.what == "pipeline":
        from flows.pipeline import pipeline

        result = pipeline(profile=PROFILE, params_file=args.params)
    else:
        from flows.request import unlearn

        result = unlearn(forget_file=args.forget_file, profile=PROFILE, params_file=args.params)
    write_json(Path(args.params).parent / f"result{'' if args.what == 'pipeline' else '-request'}.json", result)


# ------------------------------------------------------------------------------------------- the bench


def rejection_times(run: RunDir, folder: Path) -> dict[str, float]:
    """Median refusal time per bad input (``bench.rejection``), plus an overlap with the retain split."""
    from bench.rejection import time_refusal, write_bad_inputs

    folder.mkdir(parents=True, exist_ok=True)
    inputs = write_bad_inputs(folder)
    retained = read_first_retain(run)
    overlap = write_request(folder / "overlap", retained)
    inputs["overlap with the profile's retain split"] = ["--forget-file", str(overlap), "--params", str(run.params())]
    timed = {name: time_refusal(args, folder) for name, args in inputs.items()}
    refused = {name: item for name, item in timed.items() if item["exit_codes"] == [2]}
    if refused != timed:
        raise RuntimeError(f"not refused with exit code 2: {sorted(set(timed) - set(refused))}")
    return {name: item["median_s"] for name, item in timed.items()}


def read_first_retain(run: RunDir) -> list:
    from codeunlearn.data.records import read_jsonl_records

    return read_jsonl_records(run.outputs / "splits" / "retain.jsonl")[:2]


def main(argv: list[str] | None = None) -> None:
    from bench.run import MEASURED_COMMIT, machine

    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__)
    parser.add_argument("--work-dir", help="keep the runs here (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="codeunlearn-reliability-") as tmp:
        root = Path(args.work_dir or tmp)
        crashed = crash_run(root / "crashed")
        reference = reference_run(root / "reference")
        records = forget_records(reference)
        default = privacy_hits(reference, records)
        expected, actual = run_outcome(reference), run_outcome(crashed["run"])
        mismatched = differences(expected, actual)
        rejection = rejection_times(reference, root / "rejection")
        opt_in = opt_in_hits(reference, records[:8])
    payload = {
        "what": "smoke pipeline SIGKILLed mid codebook training and mid checkpoint write vs uninterrupted; "
        "forget text searched in every store; refusal times of `codeunlearn forget` (median of 3)",
        "crash_equal": not mismatched and not crashed["scratch_left"],
        "crash": {
            "compared": sorted(expected),
            "mismatched": mismatched,
            **{k: v for k, v in crashed.items() if k != "run"},
        },
        "privacy_hits": {"default": len(default), "opt_in": len(opt_in)},
        "privacy_hit_stores": {"default": sorted({s for s, _ in default}), "opt_in": sorted({s for s, _ in opt_in})},
        "rejection_s": rejection,
        "profile": PROFILE,
        "machine": machine(),
        "git_commit": MEASURED_COMMIT,
    }
    out = REPO_ROOT / "bench" / "results" / PROFILE / "reliability.json"
    write_json(out, payload)
    print(json.dumps({k: payload[k] for k in ("crash_equal", "privacy_hits", "rejection_s")}, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2:])
    else:
        main()
