"""Pre-packed fp32 linear weights: the same results as `nn.Linear`, only where packing helps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bot.engine.local import cpu_linear
from bot.engine.local.cpu_linear import PackedLinear, can_pack, pack_linear_weights

needs_onednn = pytest.mark.skipif(
    not cpu_linear.can_pack(nn.Linear(2, 2)), reason="oneDNN packing needs fp32 on an x86 CPU with mkldnn"
)


@needs_onednn
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_a_packed_linear_computes_what_the_linear_computes(rows: int) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True)
    x = torch.randn(rows, 64)
    torch.testing.assert_close(PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packing_replaces_every_linear_and_keeps_the_weights_shared() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4, bias=False)))
    x = torch.randn(3, 8)
    expected = model(x)
    weights = [model[0].weight, model[2][0].weight]
    assert pack_linear_weights(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert [model[0].weight, model[2][0].weight] == weights  # the same parameters: tying and state_dict still see them
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_packing_is_only_for_fp32_on_x86(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_linear.torch.backends.mkldnn, "is_available", lambda: True)
    assert can_pack(nn.Linear(2, 2))
    assert not can_pack(nn.Linear(2, 2).to(torch.bfloat16))
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "aarch64")
    assert not can_pack(nn.Linear(2, 2))
