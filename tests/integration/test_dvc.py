"""`dvc repro` runs the same stages from params.yaml; a second repro is a no-op; metrics are shown."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, SHARED_DATA

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SHARED_DATA / "tofu").exists(), reason="needs ../shared/data/tofu"),
    pytest.mark.skipif(shutil.which("git") is None, reason="needs git"),
]

QUICK = {
    "finetune": {"steps": 5},
    "codebook_train": {"steps": 5},
    "progress": False,
    "evaluate": {"max_new_tokens": 8, "retain_eval_size": 4},
}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if (REPO_ROOT / line).is_file()]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_dvc_repro_twice_and_metrics_show(tmp_path):
    from codeunlearn.config import deep_merge

    repo = tmp_path / "repo"
    for name in tracked_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, repo / name)
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent, target_is_directory=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["defaults"] = deep_merge(params["defaults"], QUICK)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    env.pop("MLFLOW_TRACKING_URI", None)
    git = ["git", "-c", "user.email=ci@codeunlearn.local", "-c", "user.name=ci"]
    run([*git, "init", "-q"], repo, env)
    run([*git, "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "snapshot"], repo, env)
    if not (repo / ".dvc").exists():
        run(["dvc", "init", "-q"], repo, env)

    run(["dvc", "repro"], repo, env)
    second = run(["dvc", "repro"], repo, env)
    assert "Data and pipelines are up to date" in second
    metrics = run(["dvc", "metrics", "show", "--json"], repo, env)
    assert "codeunlearn" in metrics and "forget_rouge" in metrics
    out = repo / "data" / "outputs" / "smoke"
    assert (out / "report" / "report.md").exists()
    assert (out / "studies" / "report.md").exists() and (out / "sequential" / "scalability.json").exists()
