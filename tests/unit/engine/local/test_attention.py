"""The attention the local engine picks, given the device and what is installed; and the line that says so."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import PreTrainedModel

from bot.engine.local import attention
from bot.engine.local.attention import SDPA, choose_attention
from bot.engine.local.executor import AsyncEngine
from bot.engine.local.varlen_sdpa import CB_VARLEN_SDPA
from bot.settings import Settings
from tests.support.local_engine import TIMEOUT_S

HOPPER, AMPERE, TURING = (9, 0), (8, 0), (7, 5)


def on_cuda(model: PreTrainedModel) -> SimpleNamespace:
    """The model as `choose_attention` reads it, on a CUDA device."""
    return SimpleNamespace(device=torch.device("cuda", 0), _supports_flash_attn=True, config=model.config)


def installed(*packages: str) -> dict[str, object]:
    return {
        name: (lambda name=name: name in packages)
        for name in ("flash_attention_4", "flash_attention_3", "flash_attention_2")
    }


@pytest.mark.parametrize(
    ("packages", "capability", "expected"),
    [
        (("flash_attention_4", "flash_attention_2"), HOPPER, "flash_attention_4"),
        (("flash_attention_3", "flash_attention_2"), HOPPER, "flash_attention_3"),
        (("flash_attention_2",), HOPPER, "flash_attention_2"),
        (("flash_attention_4", "flash_attention_2"), AMPERE, "flash_attention_2"),  # FA4 needs Hopper
        (("flash_attention_4",), AMPERE, SDPA),
        ((), HOPPER, SDPA),
        (("flash_attention_2",), TURING, SDPA),
    ],
)
def test_cuda_takes_the_fastest_flash_attention_installed_for_the_gpu(
    model: PreTrainedModel, packages: tuple[str, ...], capability: tuple[int, int], expected: str
) -> None:
    choice = choose_attention(on_cuda(model), installed=installed(*packages), capability=lambda device: capability)
    assert choice.implementation == expected
    assert choice.cuda_graphs is (expected != SDPA)  # flash needs no mask: CUDA graphs stay on


def test_the_reason_names_what_is_missing(model: PreTrainedModel) -> None:
    choice = choose_attention(on_cuda(model), installed=installed(), capability=lambda device: HOPPER)
    assert choice.describe() == ("sdpa (none of flash-attn-4, flash-attn-3, flash-attn is installed; no CUDA graphs)")
    chosen = choose_attention(on_cuda(model), installed=installed("flash_attention_4"), capability=lambda d: HOPPER)
    assert chosen.describe() == "flash_attention_4 (flash-attn-4 on compute capability 9.0; CUDA graphs on)"


def test_flash_attn_4_counts_only_when_its_kernels_import(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Installed without the CuTe DSL's compiler, `flash_attn.cute` raises a RuntimeError on import: the engine then
    takes the next attention instead of failing its first step."""
    usable = attention.flash_attn_4_usable.__wrapped__  # uncached
    imported: list[str] = []

    def imports(name: str) -> object:
        imported.append(name)
        return object()

    def no_compiler(name: str) -> object:
        raise RuntimeError("No CTK flavor installed")

    monkeypatch.setattr(attention, "is_flash_attn_4_available", lambda: False)
    assert usable(imports) is False and imported == []  # not installed: nothing imported
    monkeypatch.setattr(attention, "is_flash_attn_4_available", lambda: True)
    assert usable(imports) is True and imported == ["flash_attn.cute"]
    with caplog.at_level(logging.WARNING, logger=attention.__name__):
        assert usable(no_compiler) is False
    assert "No CTK flavor installed" in caplog.text


def test_a_cpu_takes_per_request_sdpa_unless_the_model_has_sliding_windows(model: PreTrainedModel) -> None:
    assert choose_attention(model).implementation == CB_VARLEN_SDPA
    windowed = SimpleNamespace(
        device=torch.device("cpu"),
        config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(num_attention_heads=2, sliding_window=4096)),
        modules=lambda: [],
    )
    assert choose_attention(windowed).implementation == SDPA
    # Per-request SDPA uses PyTorch's CPU flash kernel: another device (Apple's MPS) keeps plain SDPA.
    on_mps = SimpleNamespace(device=torch.device("mps"), config=model.config, modules=model.modules)
    assert choose_attention(on_mps).describe() == "sdpa (no flash attention on mps; no CUDA graphs)"


async def test_start_up_says_which_attention_and_cache(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bot.engine.local.executor")
    settings = Settings(_env_file=None, model=str(tiny_model_dir), device="cpu", kv_cache_memory="1MiB")  # type: ignore[call-arg]
    engine = await asyncio.wait_for(AsyncEngine.from_settings(settings), TIMEOUT_S)
    try:
        line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("attention:"))
        assert line == f"attention: {engine.attention.describe()}; KV cache: {engine.kv_cache.describe()}"
        assert "cb_varlen_sdpa (per-request SDPA" in line
        assert f"attention:      {engine.attention.describe()}" in engine.info.lines()
    finally:
        await engine.shutdown()
