"""Helpers several test modules share: tiny models and tokenizers built in code, answer NLLs, a
subprocess server started and stopped as one process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from codeunlearn.lm.generation import answer_token_logprobs, mean_nll


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


@contextmanager
def running_server(
    command: Sequence[str], log_path: Path, health_url: str, timeout_s: float, env: dict | None = None
) -> Iterator[subprocess.Popen]:
    """Start ``command`` in its own process group, wait until ``health_url`` answers 200, and stop the
    whole group afterwards (SIGTERM, then SIGKILL)."""
    log = log_path.open("w")
    server = subprocess.Popen(
        list(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env or os.environ.copy()
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
