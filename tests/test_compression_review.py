"""Review checks of the compression stack: every payload's length is its reported bytes and the sum of
its documented records for every stage combination; untouched tensors travel bit-exact; grids hold at
most their levels; edge tensors (all-zero, constant, one element, empty) survive every pipeline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedslim.codecs import CodecContext, build_pipeline, payload_size
from fedslim.engine.run import compressible_names

COMBOS = [
    [{"name": "prune", "amount": 0.5}, {"name": "quantize", "bits": 4}],
    [{"name": "quantize", "bits": 4}, {"name": "prune", "amount": 0.5}],
    [{"name": "topk", "ratio": 0.1}],
    [{"name": "topk", "ratio": 0.1, "error_feedback": False}],
    [{"name": "topk", "ratio": 0.2}, {"name": "quantize", "bits": 3, "rounding": "stochastic",
                                      "scheme": "asymmetric", "granularity": "channel"}],
    [{"name": "int8"}],
    [{"name": "prune", "amount": 0.3, "structured": True, "dim": 1}, {"name": "int8"}],
    [{"name": "int8"}, {"name": "prune", "amount": 0.6, "scope": "global"}],
    [{"name": "quantize", "bits": 1, "granularity": "channel"},
     {"name": "topk", "ratio": 0.5, "error_feedback": False}],
    [{"name": "prune", "amount": 0.9, "scope": "global"}],
]


def _bn_state() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    m(torch.randn(4, 3, 6, 6))  # BN running stats and counter move
    st = {k: v.detach().clone() for k, v in m.state_dict().items()}
    st["0.weight"][0, 0, 0, :] = 0.0  # exact zeros, as in an update
    return m, st


@pytest.mark.parametrize("targets", ["weights", "weights_and_biases", "all_float"])
@pytest.mark.parametrize("specs", COMBOS, ids=lambda s: "+".join(x["name"] for x in s))
def test_payload_length_is_reported_bytes_and_only_targets_change(specs: list, targets: str) -> None:
    m, st = _bn_state()
    names = compressible_names(m, targets)
    assert not any("running" in n or "num_batches" in n for n in names)  # buffers are never targets
    codec = build_pipeline(specs, "test")
    ctx = CodecContext("up", 3, 1, names, torch.Generator().manual_seed(5))
    payload = codec.encode(st, ctx)
    out = codec.decode(payload, ctx)
    s = codec.last_stats
    assert len(payload) == s["bytes"] == payload_size([t["bytes"] for t in s["tensors"].values()])
    for k, v in st.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        if k not in names:
            assert torch.equal(out[k], v), k  # BN statistics, counters, untargeted tensors: bit-exact
    zeros = sum(int((out[k] == 0).sum()) for k in names)
    assert s["compressed_numel"] == sum(out[k].numel() for k in names)
    assert s["measured_sparsity"] == pytest.approx(zeros / s["compressed_numel"], abs=0)
    again = build_pipeline(specs, "test").encode(st, CodecContext("up", 3, 1, names, torch.Generator().manual_seed(5)))
    assert again == payload  # same seed, same bytes


EDGE = [torch.zeros(5, 5), torch.full((5, 5), 3.0), torch.full((4, 3), -2.5), torch.tensor([7.0]), torch.empty(0, 3),
        torch.tensor(1.5)]
LOSSLESS_ON_EDGE = [[{"name": "quantize", "bits": 1}], [{"name": "quantize", "bits": 2, "granularity": "channel"}],
                    [{"name": "quantize", "bits": 4, "scheme": "asymmetric", "rounding": "stochastic"}],
                    [{"name": "quantize", "bits": 1, "scheme": "asymmetric", "granularity": "channel"}],
                    [{"name": "int8"}]]


@pytest.mark.parametrize("t", EDGE, ids=["zeros", "const", "neg_const", "one", "empty", "scalar"])
@pytest.mark.parametrize("specs", LOSSLESS_ON_EDGE, ids=lambda s: str(s[0]))
def test_constant_zero_and_tiny_tensors_are_exact_on_every_grid(t: torch.Tensor, specs: list) -> None:
    codec = build_pipeline(specs, "test")
    payload = codec.encode({"w": t}, CodecContext("up", 0, 0, frozenset({"w"}), torch.Generator().manual_seed(0)))
    assert len(payload) == codec.last_stats["bytes"]
    out = codec.decode(payload)["w"]
    if specs[0]["name"] == "int8":
        # max|w| = 127 * s with s a float32 rounded up so nothing clips: within an ulp or two, zeros exact
        assert torch.allclose(out, t, rtol=3e-7, atol=0) and torch.equal(out == 0, t == 0)
    else:  # sign grid (+-max|w|), 2-bit (s = max|w|), asymmetric (lo = min): a constant is a grid point
        assert torch.equal(out, t)


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_values_per_channel_stay_within_the_grid_levels(bits: int, scheme: str, rounding: str) -> None:
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(bits))
    codec = build_pipeline([{"name": "quantize", "bits": bits, "scheme": scheme, "rounding": rounding,
                             "granularity": "channel"}], "test")
    out = codec.decode(codec.encode({"w": x}, CodecContext("up", 0, 0, frozenset({"w"}),
                                                         torch.Generator().manual_seed(1))))["w"]
    levels = 2 ** bits - (1 if scheme == "symmetric" and bits > 1 else 0)
    assert max(len(torch.unique(row)) for row in out) <= levels


def test_topk_error_feedback_telescopes_per_client() -> None:
    """Sent + residual equals the sum of the true updates, per client, through a quantizer after top-k."""
    codec = build_pipeline([{"name": "topk", "ratio": 0.25}, {"name": "quantize", "bits": 3,
                                                              "rounding": "stochastic"}], "test")
    g = torch.Generator().manual_seed(0)
    sent = {0: torch.zeros(8, 8, dtype=torch.float64), 1: torch.zeros(8, 8, dtype=torch.float64)}
    true = {0: torch.zeros(8, 8, dtype=torch.float64), 1: torch.zeros(8, 8, dtype=torch.float64)}
    for r in range(5):
        for c in (0, 1):
            x = torch.randn(8, 8, generator=g) * (c + 1)
            ctx = CodecContext("up", c, r, frozenset({"w"}), torch.Generator().manual_seed(r * 10 + c))
            p = codec.encode({"w": x}, ctx)
            sent[c] += codec.decode(p)["w"].double()
            true[c] += x.double()
    residuals = codec.state_dict()["stages"][0]["residuals"]
    for c in (0, 1):
        assert torch.allclose(sent[c] + residuals[c]["w"].double(), true[c], atol=1e-5)
