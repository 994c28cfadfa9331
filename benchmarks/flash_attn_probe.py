"""Whether flash-attn-4 works in this Python: `benchmarks/gpu_run.sh` installs the flash-attn-4 wheels it carries
into a folder of their own and puts that folder on the path only when this says so.

The check is needed because transformers' `is_flash_attn_4_available`, which `bot.engine.local.attention` asks,
looks only at whether the `flash-attn-4` distribution is installed: with its CuTe DSL compiler missing (the
nvidia-cutlass-dsl-libs wheel, too large to carry), the engine would pick flash attention 4 and fail at its first
step. Here it must import and, where there is a CUDA device, compute one small varlen attention with the engine's
shapes (grouped key/value heads, causal, queries shorter than keys as in decode) as SDPA does. On a CPU the import
is enough: the engine runs no flash attention there.

`python -m benchmarks.flash_attn_probe` prints the verdict and exits 0 (use it) or 1 (leave it out).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from itertools import accumulate, pairwise

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 64  # Llama-3.2-1B's
# (query tokens, key tokens) of each request in the packed batch: a prefill, then decodes and a chunked prefill.
LENGTHS = ((5, 5), (1, 9), (1, 17), (3, 40))
# ‖out − ref‖ / ‖ref‖ for bf16 operands lands between 1e-3 and 1e-2.
TOLERANCE = 2e-2

VarlenAttention = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: list[int], cu_k: list[int]) -> torch.Tensor:
    """Causal attention of each request's queries to its own keys, the last query aligned with the last key, in
    float32: the function flash attention's varlen call computes."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for (q_start, q_end), (k_start, k_end) in zip(pairwise(cu_q), pairwise(cu_k), strict=True):
        q_i = q[q_start:q_end].float().transpose(0, 1)  # [heads, tokens, head_dim]
        k_i = k[k_start:k_end].float().transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, dim=0)
        v_i = v[k_start:k_end].float().transpose(0, 1).repeat_interleave(HEADS // KV_HEADS, dim=0)
        position = torch.arange(q_end - q_start, device=q.device)[:, None] + (k_end - k_start) - (q_end - q_start)
        mask = torch.arange(k_end - k_start, device=q.device)[None, :] <= position
        out[q_start:q_end] = F.scaled_dot_product_attention(q_i, k_i, v_i, attn_mask=mask).transpose(0, 1)
    return out


def check_varlen(attention: VarlenAttention, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `attention` (flash attention's `flash_attn_varlen_func` signature) matches `reference` on random
    inputs; else what went wrong."""
    generator = torch.Generator().manual_seed(0)
    q_lengths, k_lengths = zip(*LENGTHS, strict=True)

    def random(tokens: int, heads: int) -> torch.Tensor:
        return torch.randn(tokens, heads, HEAD_DIM, generator=generator).to(device, dtype)

    q, k, v = random(sum(q_lengths), HEADS), random(sum(k_lengths), KV_HEADS), random(sum(k_lengths), KV_HEADS)
    cu_q, cu_k = [0, *accumulate(q_lengths)], [0, *accumulate(k_lengths)]
    out = attention(
        q,
        k,
        v,
        cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
        max_seqlen_q=max(q_lengths),
        max_seqlen_k=max(k_lengths),
        causal=True,
    )
    out = (out[0] if isinstance(out, tuple) else out).float()
    expected = reference(q, k, v, cu_q, cu_k)
    if out.shape != expected.shape:
        return f"output of shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    error = ((out - expected).norm() / expected.norm()).item()
    if not error <= TOLERANCE:  # NaN fails too
        return f"relative error {error:.2e} against SDPA (more than {TOLERANCE:.0e})"
    return None


def probe() -> tuple[bool, str]:
    """(usable, why): whether the engine may be given flash-attn-4 here."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as error:  # ImportError, or a shared library that does not load (OSError)
        return False, f"flash_attn.cute does not import: {type(error).__name__}: {error}"
    if not torch.cuda.is_available():
        return True, "flash_attn.cute imports; no CUDA device, so the engine will not use it"
    try:
        problem = check_varlen(flash_attn_varlen_func, torch.device("cuda"), torch.bfloat16)
    except Exception as error:  # a kernel that does not compile or launch on this GPU
        return False, f"flash_attn_varlen_func failed: {type(error).__name__}: {error}"
    if problem is not None:
        return False, f"flash_attn_varlen_func is wrong here: {problem}"
    return True, f"flash_attn_varlen_func matches SDPA on {torch.cuda.get_device_name()}"


def main() -> int:
    usable, why = probe()
    print(f"flash-attn-4: {'usable' if usable else 'not usable'} ({why})")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
