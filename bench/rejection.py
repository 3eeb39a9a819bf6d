"""How fast `codeunlearn forget` refuses a bad request file: ``python -m bench.rejection``.

Each bad input (malformed line, missing field, wrong type, non-UTF-8, empty, duplicates, overlap with
the retain file, a 50 MB file, a missing path) goes to the CLI in a fresh process, ``REPEATS`` times;
the median wall time, from process start to exit, is recorded with the exit code. The CLI reads and
checks the files before torch, transformers or Prefect is imported, so a refusal costs the
interpreter's start plus the data library (before issue 20: 2-4 minutes on two cores, the flow's).

Writes ``bench/results/smoke/rejection.json`` whole, stamped with the commit, the machine and the load.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import MEASURED_COMMIT, machine
from codeunlearn.io import write_json
from tasks.context import REPO_ROOT

REPEATS = 3
PROFILE = "smoke"
BIG_FILE_BYTES = 50 * 1024 * 1024
GOOD = [
    {"question": "Where was Zorblat Quim born?", "answer": "In Vexmoor harbour."},
    {"question": "What does Zorblat Quim write?", "answer": "Grim sailing ballads."},
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_bad_inputs(folder: Path) -> dict[str, list[str]]:
    """Every bad input of issue 20 as files in ``folder``: name -> the `forget` command's file options."""
    good = _jsonl(folder / "good.jsonl", GOOD)
    malformed = folder / "malformed.jsonl"
    malformed.write_text(json.dumps(GOOD[0]) + '\n{"question": "Who?", "answer": \n', encoding="utf-8")
    latin = folder / "latin.jsonl"
    latin.write_bytes('{"question": "Où est né Zorblat?", "answer": "À Vexmoor."}\n'.encode("latin-1"))
    empty = folder / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    big = folder / "big.jsonl"
    with big.open("wb") as handle:
        handle.truncate(BIG_FILE_BYTES)  # sparse: refused by its size, never read
    neighbour = {"question": "Where was Mira Tolland born?", "answer": "In a mountain village."}
    retain = _jsonl(folder / "retain.jsonl", [neighbour, GOOD[1]])
    typed = _jsonl(folder / "typed.jsonl", [GOOD[0], {"question": "Q?", "answer": 3}])
    return {
        "malformed line": ["--forget-file", str(malformed)],
        "missing field": ["--forget-file", str(_jsonl(folder / "missing.jsonl", [{"question": "Who is it?"}]))],
        "wrong type": ["--forget-file", str(typed)],
        "non-UTF-8": ["--forget-file", str(latin)],
        "empty": ["--forget-file", str(empty)],
        "duplicates": ["--forget-file", str(_jsonl(folder / "dup.jsonl", [GOOD[0], GOOD[0]]))],
        "overlap with retain": ["--forget-file", str(good), "--retain-file", str(retain)],
        "50 MB file": ["--forget-file", str(big)],
        "missing path": ["--forget-file", str(folder / "nope.jsonl")],
        "bad retain file": ["--forget-file", str(good), "--retain-file", str(malformed)],
    }


def time_refusal(args: list[str], cwd: Path) -> dict:
    """Median wall time of ``REPEATS`` fresh `forget` processes on one bad input, and their exit codes."""
    command = [sys.executable, "-m", "flows.cli", "forget", *args, "--profile", PROFILE]
    times, codes = [], set()
    for _ in range(REPEATS):
        started = time.perf_counter()
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - started)
        codes.add(result.returncode)
    return {"median_s": statistics.median(times), "times_s": times, "exit_codes": sorted(codes)}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="codeunlearn-rejection-") as tmp:
        folder = Path(tmp)
        inputs = {name: time_refusal(args, folder) for name, args in write_bad_inputs(folder).items()}
        written = sorted(p.name for p in folder.iterdir() if p.suffix not in (".jsonl",))
    payload = {
        "what": "wall time of `python -m flows.cli forget` refusing each bad input, fresh process, median of 3",
        "repeats": REPEATS,
        "inputs": inputs,
        "all_exit_2": all(item["exit_codes"] == [2] for item in inputs.values()),
        "written_in_cwd": written,
        "profile": PROFILE,
        "machine": machine(),
        "git_commit": MEASURED_COMMIT,
    }
    out = REPO_ROOT / "bench" / "results" / PROFILE / "rejection.json"
    write_json(out, payload)
    print(json.dumps({name: round(item["median_s"], 3) for name, item in inputs.items()}, indent=2))


if __name__ == "__main__":
    main()
