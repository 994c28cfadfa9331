"""The flash-attn-4 check accepts a correct varlen attention, refuses wrong ones, and refuses a package that does
not import (as on the H200 image, which lacks the CuTe DSL compiler)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from benchmarks.flash_attn_probe import check_varlen, probe

CPU = torch.device("cpu")


def sdpa_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    bottom_right: bool = True,
    grouped: bool = True,
) -> tuple[torch.Tensor, None]:
    """Flash attention's varlen call written with torch's own causal bias and grouped-query SDPA; `bottom_right` and
    `grouped` off make the mistakes a kernel could make (top-left causal alignment, key/value heads shared wrongly)."""
    outputs = []
    for i in range(len(cu_seqlens_q) - 1):
        q_i = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]].transpose(0, 1)[None]
        k_i = k[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].transpose(0, 1)[None]
        v_i = v[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].transpose(0, 1)[None]
        if not grouped:
            repeats = q.shape[1] // k.shape[1]
            k_i, v_i = k_i.repeat(1, repeats, 1, 1), v_i.repeat(1, repeats, 1, 1)
        if bottom_right:
            out = F.scaled_dot_product_attention(
                q_i, k_i, v_i, attn_mask=causal_lower_right(q_i.shape[2], k_i.shape[2]), enable_gqa=grouped
            )
        else:
            out = F.scaled_dot_product_attention(q_i, k_i, v_i, is_causal=causal, enable_gqa=grouped)
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs), None


def test_a_correct_varlen_attention_passes() -> None:
    assert check_varlen(sdpa_varlen, CPU, torch.float32) is None
    assert check_varlen(sdpa_varlen, CPU, torch.bfloat16) is None


@pytest.mark.parametrize("mistake", [{"bottom_right": False}, {"grouped": False}])
def test_a_wrong_varlen_attention_is_refused(mistake: dict[str, bool]) -> None:
    def wrong(*args: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, None]:
        return sdpa_varlen(*args, **kwargs, **mistake)  # type: ignore[arg-type]

    assert "relative error" in (check_varlen(wrong, CPU, torch.float32) or "")


def test_a_package_that_does_not_import_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # its import raises ImportError
    usable, why = probe()
    assert not usable
    assert why.startswith("flash_attn.cute does not import: ")
