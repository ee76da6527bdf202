"""quantize / int8: error bounds, unbiasedness, n-bit-ness and edge-case tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedslim.codecs import CodecContext, CodecError, Quantize, build_pipeline, compress_state, quantize_flat


def run(tensors, stages, gen=None, client=0, compressible=None):
    codec = build_pipeline(stages, "test")
    names = frozenset(tensors) if compressible is None else frozenset(compressible)
    ctx = CodecContext("up", client, 0, names, gen)
    payload = codec.encode(tensors, ctx)
    return payload, codec.decode(payload, ctx), codec.last_stats


def q(bits, rounding="nearest", scheme="symmetric", granularity="tensor"):
    return [{"name": "quantize", "bits": bits, "rounding": rounding, "scheme": scheme,
             "granularity": granularity}]


def ideal_step(w: torch.Tensor, bits: int, scheme: str, per_channel: bool) -> torch.Tensor:
    """The grid step each element should see, from the definition (not from the codec)."""
    w = w.double()
    rows = w.reshape(w.shape[0], -1) if per_channel and w.dim() >= 2 else w.reshape(1, -1)
    nz = rows != 0
    if scheme == "symmetric":
        m = rows.abs().amax(dim=1)
        step = 2 * m if bits == 1 else m / (2 ** (bits - 1) - 1)
    else:
        hi = torch.where(nz, rows, torch.tensor(-torch.inf, dtype=w.dtype)).amax(dim=1)
        lo = torch.where(nz, rows, torch.tensor(torch.inf, dtype=w.dtype)).amin(dim=1)
        step = (hi - lo) / (2 ** bits - 1)
    return step[:, None].expand_as(rows).reshape(w.shape)


def sample_weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, 3, generator=g) * torch.arange(1, 7).view(6, 1, 1)  # channel scales 1..6
    return w + 0.3 * torch.arange(6).view(6, 1, 1)  # and off-centre, for the asymmetric grid


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_nearest_rounding_within_half_a_step(bits: int, scheme: str, granularity: str) -> None:
    w = sample_weight(bits)
    _, out, stats = run({"w": w}, q(bits, "nearest", scheme, granularity))
    got = out["w"]
    assert got.dtype == torch.float32 and got.shape == w.shape
    step = ideal_step(w, bits, scheme, granularity == "channel")
    err = (got.double() - w.double()).abs()
    assert (err <= 0.5 * step * (1 + 1e-5) + 1e-7 * w.double().abs()).all(), float((err / step).max())
    if bits <= 8:  # the bound is tight: some element is at least a tenth of a step off
        assert (err / step).max() > 0.1
    # Really n-bit: each scale group holds at most 2**n distinct values (2**n - 1 for symmetric n >= 2).
    levels = 2 ** bits - (1 if scheme == "symmetric" and bits >= 2 else 0)
    groups = got.reshape(6, -1) if granularity == "channel" else got.reshape(1, -1)
    assert max(len(torch.unique(r)) for r in groups) <= levels
    assert stats["bits"] == bits and stats["tensors"]["w"]["bits"] == bits


@pytest.mark.parametrize("scheme,granularity,bits", [("symmetric", "tensor", 2), ("symmetric", "tensor", 1),
                                                     ("asymmetric", "channel", 3), ("symmetric", "channel", 4)])
def test_stochastic_rounding_is_unbiased(scheme: str, granularity: str, bits: int) -> None:
    draws, k = 4000, 40
    base = torch.randn(2, 1, k, generator=torch.Generator().manual_seed(7)) * torch.tensor([1.0, 3.0]).view(2, 1, 1)
    w = base.expand(2, draws, k).contiguous()  # every row is one independent draw of the same values
    _, out, _ = run({"w": w}, q(bits, "stochastic", scheme, granularity),
                    gen=torch.Generator().manual_seed(123))
    step = ideal_step(w, bits, scheme, granularity == "channel")[:, 0, :].double()
    got = out["w"].double()
    # Each draw lands on one of the two neighbouring grid values ...
    assert ((got - w.double()).abs() < step[:, None, :] * (1 + 1e-6)).all()
    # ... and the mean over draws converges to the value: per-draw std <= step / 2.
    mean_err = got.mean(dim=1) - base[:, 0, :].double()
    bound = 5 * step / (2 * draws ** 0.5)
    assert (mean_err.abs() <= bound).all(), float((mean_err.abs() / bound).max())
    # Round-to-nearest on the same data is measurably biased, so the check above has teeth.
    _, near, _ = run({"w": w}, q(bits, "nearest", scheme, granularity))
    near_err = (near["w"].double().mean(dim=1) - base[:, 0, :].double()).abs()
    assert near_err.mean() > 5 * mean_err.abs().mean()


def test_stochastic_rounding_uses_only_the_context_generator() -> None:
    w = {"w": torch.randn(50, 20)}
    p1, _, _ = run(w, q(3, "stochastic"), gen=torch.Generator().manual_seed(5))
    torch.manual_seed(999)  # the global RNG must not matter
    p2, _, _ = run(w, q(3, "stochastic"), gen=torch.Generator().manual_seed(5))
    p3, _, _ = run(w, q(3, "stochastic"), gen=torch.Generator().manual_seed(6))
    assert p1 == p2 and p1 != p3
    with pytest.raises(CodecError, match="generator"):
        run(w, q(3, "stochastic"), gen=None)


def test_zero_stays_zero_and_is_left_out_of_the_range() -> None:
    w = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 4.0, 5.0]])
    for scheme in ("symmetric", "asymmetric"):
        for bits in (1, 2, 8):
            _, out, stats = run({"w": w}, q(bits, scheme=scheme))
            assert (out["w"][w == 0] == 0).all(), (scheme, bits)
            # Any other zero is a counted rounding zero (only the symmetric n >= 2 grid has a 0 level).
            extra = int(((out["w"] == 0) & (w != 0)).sum())
            assert extra == stats["rounding_zeros"]
            # 2-bit symmetric: levels -5, 0, 5 (scale max|w|), so 1 and 2 round to 0.
            assert extra == (2 if (scheme, bits) == ("symmetric", 2) else 0)
    # Asymmetric range over the nonzeros [1, 5]: with 2 bits the grid is 1, 2.33, 3.67, 5.
    _, out, _ = run({"w": w}, q(2, scheme="asymmetric"))
    assert out["w"].max() == pytest.approx(5.0) and out["w"][w != 0].min() == pytest.approx(1.0)


@pytest.mark.parametrize("stages", [q(8), q(4, scheme="asymmetric", granularity="channel"), q(1),
                                    [{"name": "int8"}], q(3, "stochastic", granularity="channel")])
def test_empty_constant_one_element_and_non_contiguous(stages) -> None:
    t = {
        "empty": torch.zeros(0),
        "empty2d": torch.zeros(0, 3),
        "empty_mid": torch.zeros(3, 0, 2),
        "const": torch.full((4, 5), -0.75),
        "zeros": torch.zeros(3, 3),
        "one": torch.tensor([2.5]),
        "scalar": torch.tensor(-1.25),
        "strided": torch.randn(8, 6, generator=torch.Generator().manual_seed(1)).t(),
    }
    assert not t["strided"].is_contiguous()
    payload, out, _ = run(t, stages, gen=torch.Generator().manual_seed(0))
    assert list(out) == list(t)
    for name, x in t.items():
        assert out[name].shape == x.shape and out[name].dtype == x.dtype, name
    assert torch.equal(out["zeros"], t["zeros"])
    # One value alone is the whole range: every grid puts it exactly on an end point.
    for name in ("const", "one", "scalar"):
        assert torch.allclose(out[name], t[name], rtol=1e-6, atol=0), (name, out[name])
    assert len(torch.unique(out["const"])) == 1
    # A strided view encodes like its contiguous copy.
    _, ref, _ = run({"strided": t["strided"].contiguous()}, stages, gen=torch.Generator().manual_seed(0))
    if "stochastic" not in str(stages):
        assert torch.equal(out["strided"], ref["strided"])


def test_asymmetric_constant_is_exact() -> None:
    x = torch.full((7,), 0.1)
    _, out, _ = run({"x": x}, q(3, scheme="asymmetric"))
    assert torch.equal(out["x"], x)


def test_int8_zero_aware_and_counts_rounding_zeros() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 64, generator=g) * 0.02
    w.view(-1)[::10] = 0.0  # some true zeros
    _, out, stats = run({"w": w}, [{"name": "int8"}])
    scale = w.abs().max().double() / 127
    codes = torch.round(w.double() / scale)
    assert torch.equal(torch.round(out["w"].double() / scale), codes)
    assert torch.allclose(out["w"].double(), codes * scale, atol=1e-6 * w.abs().max().item(), rtol=0)
    # Zeros: the true zeros, plus exactly the nonzeros that round to code 0; nothing else.
    rounding_zeros = int(((w != 0) & (codes == 0)).sum())
    assert rounding_zeros > 0
    assert stats["rounding_zeros"] == rounding_zeros
    assert int((out["w"] == 0).sum()) == int((w == 0).sum()) + rounding_zeros
    assert stats["measured_sparsity"] == pytest.approx(float((out["w"] == 0).float().mean()))
    assert stats["bits"] == 8


def test_stage_objects_and_data_free_api() -> None:
    w = {"layer.weight": torch.randn(10, 10), "layer.bias": torch.randn(10)}
    payload, dec, stats = compress_state(w, [Quantize(bits=4)])
    assert torch.equal(dec["layer.bias"], w["layer.bias"])  # default: >= 2-d weights only
    assert stats["bytes"] == len(payload) and stats["bits"] == 4
    assert len(torch.unique(dec["layer.weight"])) <= 15
    with pytest.raises(ValueError):
        Quantize(bits=0)


@pytest.mark.parametrize("bits", [1, 2, 7, 16])
def test_float32_scales_are_rounded_outwards_so_nothing_clips(bits: int) -> None:
    # Without the outward rounding an extreme element can sit a hair outside the grid, get clipped and
    # lose stochastic rounding's unbiasedness there; check the cover on many awkward ranges directly.
    rng = np.random.default_rng(bits)
    for _ in range(200):
        v = rng.normal(rng.normal() * 10, 10 ** rng.uniform(-6, 3), size=11)
        for scheme in ("symmetric", "asymmetric"):
            grid, codes, new = quantize_flat(v, (11,), bits, scheme, False)
            step = grid.step[0]
            if grid.kind == "asym":
                lo = float(grid.lo[0])
                assert lo <= v.min() and lo + (2 ** bits - 1) * step >= v.max()
            elif grid.kind == "sym":
                assert (2 ** (bits - 1) - 1) * step >= np.abs(v).max()
            else:
                assert step / 2 >= np.abs(v).max()
            assert (np.abs(new - v) <= step / 2 * (1 + 1e-12)).all()
