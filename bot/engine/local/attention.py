"""Which attention the local engine runs under continuous batching: the fastest the device and the installed packages
allow, said once at start-up and in `/info`.

- CUDA, in order: flash attention 4 (the `flash-attn-4` package, Hopper and newer), flash attention 3
  (`flash-attn-3`, Hopper), flash attention 2 (`flash-attn`, Ampere and newer), then SDPA. Flash attention needs no
  attention mask, so continuous batching runs it with CUDA graphs (and asynchronous batching); SDPA needs one, which
  turns CUDA graphs off. Flash attention 2 and 3 also get continuous batching's paged decode kernel.
- A CPU has no flash attention: `cb_varlen_sdpa` (per-request SDPA, `varlen_sdpa.py`) where the model has full
  attention only, else SDPA. Other devices (MPS) take SDPA.

Availability is transformers' own check (`is_flash_attn_*_available`), without its fallback to kernels downloaded
from the Hub: the bot's machines may not reach it. For flash attention 4 that check only finds the distribution; its
kernels are compiled at run time by the CuTe DSL, whose compiler is a wheel of its own (about 90 MB), and without it
`flash_attn.cute` fails to import. So it is also imported once, here, rather than failing the first step.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_flash_attn_4_available

from bot.engine.local.varlen_sdpa import CB_VARLEN_SDPA, varlen_sdpa_supported

log = logging.getLogger(__name__)

SDPA = "sdpa"
# (implementation, the package that provides it, the least compute capability it runs on), fastest first.
FLASH_ATTENTION: tuple[tuple[str, str, tuple[int, int]], ...] = (
    ("flash_attention_4", "flash-attn-4", (9, 0)),
    ("flash_attention_3", "flash-attn-3", (9, 0)),
    ("flash_attention_2", "flash-attn", (8, 0)),
)


@functools.cache
def flash_attn_4_usable(import_module: Callable[[str], object] = importlib.import_module) -> bool:
    """flash-attn-4 installed, CUDA present, and its CuTe kernels importable (the DSL's compiler installed)."""
    if not is_flash_attn_4_available():
        return False
    try:
        import_module("flash_attn.cute")
    except Exception as error:  # the missing compiler is a RuntimeError ("No CTK flavor installed"), not ImportError
        log.warning("flash-attn-4 is installed but cannot be used: %s: %s", type(error).__name__, error)
        return False
    return True


INSTALLED: dict[str, Callable[[], bool]] = {
    "flash_attention_4": flash_attn_4_usable,
    "flash_attention_3": is_flash_attn_3_available,
    "flash_attention_2": is_flash_attn_2_available,
}


@dataclass(frozen=True, slots=True)
class AttentionChoice:
    implementation: str  # the model's attn_implementation under continuous batching
    cuda_graphs: bool
    reason: str

    def describe(self) -> str:
        graphs = "CUDA graphs on" if self.cuda_graphs else "no CUDA graphs"
        return f"{self.implementation} ({self.reason}; {graphs})"


def choose_attention(
    model: Any,
    *,
    installed: dict[str, Callable[[], bool]] = INSTALLED,
    capability: Callable[[torch.device], tuple[int, int]] = torch.cuda.get_device_capability,
) -> AttentionChoice:
    """The attention for `model` on its device. `installed` and `capability` are transformers' and torch's checks;
    the tests pass their own."""
    device = model.device
    if device.type == "cpu":
        if varlen_sdpa_supported(model):
            return AttentionChoice(CB_VARLEN_SDPA, False, "per-request SDPA: no flash attention on a CPU")
        return AttentionChoice(SDPA, False, "the model has attention per-request SDPA does not know")
    if device.type != "cuda":  # per-request SDPA runs PyTorch's CPU flash kernel for prompt chunks
        return AttentionChoice(SDPA, False, f"no flash attention on {device.type}")
    if not getattr(model, "_supports_flash_attn", False):
        return AttentionChoice(SDPA, False, f"{type(model).__name__} does not support flash attention")
    have = capability(device)
    missing = []
    for implementation, package, least in FLASH_ATTENTION:
        if have < least:
            continue
        if installed[implementation]():
            return AttentionChoice(implementation, True, f"{package} on compute capability {have[0]}.{have[1]}")
        missing.append(package)
    reason = f"none of {', '.join(missing)} is installed" if missing else "no flash attention for this GPU"
    return AttentionChoice(SDPA, False, reason)
