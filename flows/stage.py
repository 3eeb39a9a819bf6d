"""Run one stage without Prefect (what ``dvc repro`` calls): ``python -m flows.stage <stage> [--profile NAME]
[--params FILE]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.registry import TASKS
from tasks.context import make_context
from tasks.stages import STAGES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--profile", default=None, help="profile in params.yaml (default: its `profile` field)")
    parser.add_argument("--params", default=None, help="params file (default: the repository's params.yaml)")
    args = parser.parse_args(argv)
    params_file = Path(args.params) if args.params else None
    # DVC decides what is stale (it also tracks code), so the flows' own resume markers stay out of it.
    TASKS[args.stage].fn(make_context(args.profile, params_file, overrides={"resume": False}))


if __name__ == "__main__":
    main()
