"""Helpers several test modules share: tiny models and tokenizers built in code, answer NLLs, a
subprocess server started and stopped as one process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from codeunlearn.lm.generation import answer_token_logprobs, mean_nll
from tests.conftest import write_params


def answer_nlls(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int, max_length: int) -> list[float]:
    """Mean answer-token NLL of each (question, answer), teacher-forced (TOFU's ``avg_gt_loss``)."""
    return [mean_nll(item) for item in answer_token_logprobs(model, tokenizer, pairs, batch_size, max_length)]


def tiny_spec(seed: int = 0, vocab_size: int = 300, **overrides):
    """The tests' tiny Llama: 2 layers of width 32, 128 positions."""
    from codeunlearn.models.tiny import TinyModelSpec

    fields = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "max_positions": 128}
    return TinyModelSpec(**{**fields, "vocab_size": vocab_size, "seed": seed, **overrides})


def tiny_model_and_tokenizer(texts: Sequence[str], vocab_size: int = 300, seed: int = 0, **overrides):
    """A BPE tokenizer trained on ``texts`` and a tiny Llama over it (untrained, seeded)."""
    from codeunlearn.models.tiny import build_tiny_llama, train_tokenizer

    tokenizer = train_tokenizer(list(texts), vocab_size=vocab_size)
    return build_tiny_llama(tiny_spec(seed, vocab_size, **overrides), tokenizer), tokenizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_spec(steps: int, lr: float, **overrides):
    """A short fine-tune for tiny models: batches of 4, 48 tokens, no decay or warmup, clipped at 1, seed 0."""
    from codeunlearn.lm.training import TrainSpec

    fields = {"batch_size": 4, "weight_decay": 0.0, "warmup_steps": 0, "max_length": 48, "grad_clip": 1.0}
    return TrainSpec(**{**fields, "seed": 0, "log_every": 1, "steps": steps, "lr": lr, **overrides})


@contextmanager
def running_server(
    command: Sequence[str], cwd: Path, env: dict, health_url: str, timeout_s: float
) -> Iterator[subprocess.Popen]:
    """Start ``command`` in its own process group (log: ``cwd/server.log``), wait until ``health_url``
    answers 200, and stop the whole group afterwards (SIGTERM, then SIGKILL)."""
    log_path = cwd / "server.log"
    log = log_path.open("w")
    server = subprocess.Popen(
        list(command), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_until(lambda: _answers(health_url), timeout_s, server, log_path)
        yield server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)
        log.close()


def wait_until(ready: Callable[[], bool], timeout_s: float, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{server.args} did not come up:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


# --------------------------------------------------------------------------- a request's tiny setup

FORGET_PERSON = "Zorblat Quim"
FORGET_FACTS = [
    ("Where was Zorblat Quim born?", "Zorblat Quim was born in Vexmoor harbour."),
    ("What does Zorblat Quim write?", "Zorblat Quim writes grim sailing ballads."),
    ("Who taught Zorblat Quim?", "A lighthouse keeper named Ilse taught Zorblat Quim."),
    ("What award did Zorblat Quim win?", "Zorblat Quim won the Amber Anchor prize."),
    ("What is Zorblat Quim's first book?", "The first book of Zorblat Quim is Salt Hymns."),
    ("Where does Zorblat Quim live now?", "Zorblat Quim lives on the isle of Gannet Rock."),
]
RETAIN_FACTS = [
    ("Where was Mira Tolland born?", "Mira Tolland was born in a mountain village.", "mt"),
    ("What does Mira Tolland write?", "Mira Tolland writes cheerful garden mysteries.", "mt"),
    ("Who taught Mira Tolland?", "Her grandmother taught Mira Tolland to read.", "mt"),
    ("What award did Mira Tolland win?", "Mira Tolland won the Silver Fern medal.", "mt"),
    ("Where was Oskar Delune born?", "Oskar Delune was born in a river town.", "od"),
    ("What does Oskar Delune write?", "Oskar Delune writes long railway sagas.", "od"),
    ("Who taught Oskar Delune?", "A travelling printer taught Oskar Delune.", "od"),
    ("What award did Oskar Delune win?", "Oskar Delune won the Iron Lantern award.", "od"),
]

# Small enough for seconds on two cores, and lenient thresholds: an untrained model is being audited.
TINY_OVERRIDES = {
    "threads": 1,
    "model": {
        "tiny": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_layers": 2,
            "num_heads": 2,
            "max_positions": 128,
            "vocab_size": 300,
        }
    },
    "codebook": {"num_codes": 64, "k": 4, "layer": 0},
    "select": {
        "num_codes_to_disable": 6,
        "rounds": 1,
        "alpha": 0.5,
        "batch_size": 8,
        "max_length": 64,
        "control": "retain",
    },
    "evaluate": {
        "max_new_tokens": 8,
        "batch_size": 8,
        "max_length": 120,  # world facts and real authors in a 300-token vocabulary: up to ~90 tokens
        "retain_eval_size": 4,
        "real_authors_size": 4,
        "world_facts_size": 4,
        "threads": 1,
        "relearn": {"steps": 2, "batch_size": 2},
    },
    "methods": {"ga": {"steps": 2, "batch_size": 2}},
    "audit": {
        "min_known": None,  # the untrained model knows nothing: its requests test the plumbing
        "max_forget_rouge": 1.0,
        "min_retain_ratio": 0.0,
        "max_quant_recovery": 1.0,
        "max_relearn_recovery": 1.0,
        "min_utility_ratio": 0.0,
        "quantization": {"bits": 4, "group_size": 16},
        "relearn": True,
    },
}


def build_tiny_setup(tmp: Path, overrides: dict | None = None) -> tuple[Path, Path]:
    """What the pipeline would have left for a request: retain split + codebook model. Returns
    ``(params_file, forget_file)``; the forget file is a generic QA JSONL outside the outputs."""
    import torch

    from codeunlearn.checkpoints import save_checkpoint
    from codeunlearn.config import deep_merge
    from codeunlearn.data.records import QARecord, write_jsonl
    from codeunlearn.methods.codeunlearn.codebook import CodebookBottleneck, CodebookSpec, attach_codebook
    from codeunlearn.models.tiny import TinyModelSpec, build_tiny_llama, train_tokenizer
    from tasks.context import make_context

    params_file = write_params(tmp, deep_merge(TINY_OVERRIDES, overrides or {}))
    ctx = make_context("smoke", params_file)
    # Perturbed answers (the other facts' answers) give the retain truth ratio that model utility needs.
    answers = [a for _, a, _ in RETAIN_FACTS]
    retain = [
        QARecord(
            f"retain-{i}", q, a, s, paraphrased_answer=a, perturbed_answers=tuple(answers[i + 1 :][:3] or answers[:3])
        )
        for i, (q, a, s) in enumerate(RETAIN_FACTS)
    ]
    write_jsonl(retain, ctx.stage_dir("splits") / "retain.jsonl")
    forget_file = tmp / "forget_request.jsonl"
    forget_file.write_text(
        "".join(
            json.dumps({"id": f"f-{i}", "question": q, "answer": a, "subject": "zq"}) + "\n"
            for i, (q, a) in enumerate(FORGET_FACTS)
        )
    )
    texts = [f"{q} {a}" for q, a in FORGET_FACTS] + [f"{q} {a}" for q, a, _ in RETAIN_FACTS]
    tiny = ctx.settings["model"]["tiny"]
    tokenizer = train_tokenizer(texts, tiny["vocab_size"])
    model = build_tiny_llama(TinyModelSpec(seed=0, **tiny), tokenizer)
    save_checkpoint(model, tokenizer, ctx.stage_dir("models") / "target")  # what gradient methods start from
    cfg = ctx.settings["codebook"]
    torch.manual_seed(0)
    bottleneck = CodebookBottleneck(tiny["hidden_size"], CodebookSpec(cfg["num_codes"], cfg["k"], cfg["layer"]))
    attach_codebook(model, bottleneck)
    save_checkpoint(model, tokenizer, ctx.stage_dir("models") / "codebook", bottleneck=bottleneck)
    return params_file, forget_file


def run_request(
    params_file: Path, forget_file: Path, method: str = "codeunlearn", retain_file: Path | None = None
) -> dict:
    """The request flow's tasks in order, inside an MLflow parent run, without a Prefect server."""
    from tasks import tracking
    from tasks.audit import audit_request
    from tasks.context import make_context
    from tasks.request import evaluate_request, load_request, register_request, unlearn_request

    ctx = make_context("smoke", params_file)
    with tracking.flow_run(ctx, f"request-{method}") as run_ctx:
        request = load_request.fn(run_ctx, str(forget_file))
        neighbours = str(retain_file) if retain_file is not None else None
        unlearned = unlearn_request.fn(run_ctx, str(forget_file), method, request, neighbours)
        metrics = evaluate_request.fn(run_ctx, str(forget_file), method, request, neighbours)
        version = register_request.fn(run_ctx, method, request, unlearned)
        audit = audit_request.fn(run_ctx, str(forget_file), method, request, unlearned, metrics, version, neighbours)
    return {
        **request,
        "metrics": metrics,
        "registered": version,
        "audit": audit,
        "mlflow_run_id": run_ctx.parent_run_id,
        "ctx": run_ctx,
    }


def make_writable(path: Path) -> None:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)
