"""prune (and prune/int8 composites): exact sparsity, torch.nn.utils.prune semantics, structured."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

from fedslim.codecs import CodecContext, build_pipeline, compress_state, magnitude_masks


def run(tensors, stages, compressible=None):
    codec = build_pipeline(stages, "test")
    names = frozenset(tensors) if compressible is None else frozenset(compressible)
    ctx = CodecContext("down", -1, 0, names, None)
    payload = codec.encode(tensors, ctx)
    return payload, codec.decode(payload, ctx), codec.last_stats


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(16, 6, 5, 5, generator=g),
            "fc.weight": torch.randn(30, 41, generator=g) * 0.1,
            "head.weight": torch.randn(10, 30, generator=g) * 3}


@pytest.mark.parametrize("amount", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_layer_pruning_hits_the_requested_sparsity_exactly(amount: float) -> None:
    w = weights()
    _, out, stats = run(w, [{"name": "prune", "amount": amount}])
    zeros = total = 0
    for name, x in w.items():
        dropped = out[name] == 0
        assert int(dropped.sum()) == round(amount * x.numel()), name
        # The smallest magnitudes go, and the survivors are untouched (float32 travels as float32).
        assert x[dropped].abs().max() <= x[~dropped].abs().min()
        assert torch.equal(out[name][~dropped], x[~dropped])
        zeros, total = zeros + int(dropped.sum()), total + x.numel()
    assert stats["nominal_sparsity"] == amount
    assert stats["measured_sparsity"] == zeros / total


@pytest.mark.parametrize("amount", [0.3, 0.6])
def test_global_pruning_within_one_element_with_one_threshold(amount: float) -> None:
    w = weights(1)
    _, out, _ = run(w, [{"name": "prune", "amount": amount, "scope": "global"}])
    total = sum(x.numel() for x in w.values())
    zeros = sum(int((out[n] == 0).sum()) for n in w)
    assert abs(zeros - amount * total) <= 1
    dropped = torch.cat([w[n][out[n] == 0].abs() for n in w])
    kept = torch.cat([w[n][out[n] != 0].abs() for n in w])
    assert dropped.max() <= kept.min()
    # Global is not per-layer: the small-valued fc layer loses far more than its share.
    assert (out["fc.weight"] == 0).float().mean() > amount + 0.1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 16, 5)
        self.fc = nn.Linear(41, 30)
        self.head = nn.Linear(30, 10)


def _ours_after_torch_pruned(net: Net, state: dict, amount: float, kind: str) -> dict:
    """Prune ``net``'s weights with torch.nn.utils.prune as ``kind`` says (leaving ``weight_mask`` on each
    module), and return magnitude_masks of ``state`` for the same setting."""
    params = [(net.conv, "weight"), (net.fc, "weight"), (net.head, "weight")]
    if kind == "layer":
        for m, p in params:
            tprune.l1_unstructured(m, p, amount)
        return magnitude_masks(state, amount)
    if kind == "global":
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=amount)
        return magnitude_masks(state, amount, scope="global")
    dim, n = (1, 1) if kind == "channels" else (0, 2 if kind == "filters_l2" else 1)
    for m, p in params:
        tprune.ln_structured(m, p, amount, n=n, dim=dim)
    return magnitude_masks(state, amount, structured=True, dim=dim, norm=n)


@pytest.mark.parametrize("kind", ["layer", "global", "filters", "channels", "filters_l2"])
def test_masks_match_torch_nn_utils_prune(kind: str) -> None:
    torch.manual_seed(0)
    net = Net()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    amount = 0.4
    ours = _ours_after_torch_pruned(net, state, amount, kind)
    assert set(ours) == {"conv.weight", "fc.weight", "head.weight"}
    for name, mask in ours.items():
        mod = getattr(net, name.split(".")[0])
        assert mask.dtype == torch.bool
        assert torch.equal(mask, mod.weight_mask.bool()), name


@pytest.mark.parametrize("dim", [0, 1])
def test_structured_pruning_zeroes_whole_slices(dim: int) -> None:
    w = weights(2)
    w["conv.bias"] = torch.randn(16)
    _, out, stats = run(w, [{"name": "prune", "amount": 0.5, "structured": True, "dim": dim}])
    assert torch.equal(out["conv.bias"], w["conv.bias"])  # 1-d tensors are left alone
    for name in ("conv.weight", "fc.weight", "head.weight"):
        x = out[name].movedim(dim, 0).reshape(w[name].shape[dim], -1)
        dead = (x == 0).all(dim=1)
        assert int(dead.sum()) == round(0.5 * w[name].shape[dim]), name
        assert (x[~dead] != 0).all()  # nothing else zeroed
        norms = w[name].movedim(dim, 0).reshape(w[name].shape[dim], -1).abs().sum(dim=1)
        assert norms[dead].max() <= norms[~dead].min()
    assert stats["nominal_sparsity"] == 0.5


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.9])
def test_prune_then_int8_keeps_sparsity_and_adds_only_rounding_zeros(amount: float) -> None:
    g = torch.Generator().manual_seed(4)
    w = {"w": torch.randn(100, 80, generator=g) * 0.02}  # many |w| < 0.01, as in HybridCompFL's models
    _, out, stats = run(w, [{"name": "prune", "amount": amount}, {"name": "int8"}])
    pruned_only = run(w, [{"name": "prune", "amount": amount}])[1]["w"]
    pruned = pruned_only == 0
    assert int(pruned.sum()) == round(amount * 8000)
    # Expected rounding zeros, counted independently: survivors with round(w / scale) == 0.
    scale = pruned_only.abs().max().double() / 127
    rounding = (~pruned) & (torch.round(pruned_only.double() / scale) == 0)
    got_zero = out["w"] == 0
    assert (got_zero[pruned]).all()
    assert torch.equal(got_zero & ~pruned, rounding)
    assert stats["rounding_zeros"] == int(rounding.sum())
    assert stats["measured_sparsity"] == pytest.approx((int(pruned.sum()) + int(rounding.sum())) / 8000)


def test_hybridcompfl_min_nonzero_fault_is_gone() -> None:
    g = torch.Generator().manual_seed(6)
    w = {"w": torch.randn(100, 80, generator=g) * 0.02}
    _, out, stats = run(w, [{"name": "prune", "amount": 0.1}, {"name": "int8"}])
    # The reference zeroed every |w| < min_nonzero = 0.01 after pruning: ~40 % sparsity here.
    ref_fault = float((w["w"].abs() < 0.01).float().mean())
    assert ref_fault > 0.35
    assert stats["nominal_sparsity"] == 0.1
    assert 0.1 <= stats["measured_sparsity"] < 0.11
    assert stats["measured_sparsity"] == pytest.approx(float((out["w"] == 0).float().mean()))


def test_quantize_then_prune_differs_from_prune_then_quantize() -> None:
    g = torch.Generator().manual_seed(5)
    w = {"w": torch.randn(40, 40, generator=g)}
    # Same 3-bit grid either way (pruning keeps the extremes): zero below half a step, max|w| / 6.
    small = int((w["w"].abs() < w["w"].abs().max() / 6).sum())

    # Pruning less than rounding zeroes: prune -> quantize adds rounding zeros to the k pruned;
    # quantize -> prune finds k zeros already there and prunes nothing more.
    k = round(0.3 * 1600)
    assert small > k
    _, a, sa = run(w, [{"name": "prune", "amount": 0.3}, {"name": "quantize", "bits": 3}])
    _, b, sb = run(w, [{"name": "quantize", "bits": 3}, {"name": "prune", "amount": 0.3}])
    assert sa["rounding_zeros"] == small - k and int((a["w"] == 0).sum()) == small
    assert sb["rounding_zeros"] == small and int((b["w"] == 0).sum()) == small

    # Pruning more: both exactly k zeros, but quantize -> prune ranks by quantized magnitude, where
    # many elements tie on one level, so it no longer removes exactly the k smallest |w|.
    k = round(0.6 * 1600)
    _, a, sa = run(w, [{"name": "prune", "amount": 0.6}, {"name": "quantize", "bits": 3}])
    _, b, sb = run(w, [{"name": "quantize", "bits": 3}, {"name": "prune", "amount": 0.6}])
    assert int((a["w"] == 0).sum()) == k == int((b["w"] == 0).sum())
    mag = w["w"].abs()
    assert mag[a["w"] == 0].max() <= mag[a["w"] != 0].min()
    assert mag[b["w"] == 0].max() > mag[b["w"] != 0].min()
    assert not torch.equal(a["w"], b["w"])
    for out, st in ((a, sa), (b, sb)):
        assert len(torch.unique(out["w"])) <= 7
        assert st["tensors"]["w"]["mode"] in ("bitmap", "varint")


def test_magnitude_masks_default_targets_and_device() -> None:
    state = {"a.weight": torch.randn(8, 4), "a.bias": torch.randn(8), "bn.weight": torch.ones(8),
             "bn.running_mean": torch.zeros(8), "bn.num_batches_tracked": torch.tensor(3)}
    masks = magnitude_masks(state, 0.25)
    assert set(masks) == {"a.weight"}
    assert int((~masks["a.weight"]).sum()) == 8
    masks = magnitude_masks(state, 0.5, compressible=["a.weight", "a.bias"])
    assert set(masks) == {"a.weight", "a.bias"} and int((~masks["a.bias"]).sum()) == 4
    with pytest.raises(ValueError):
        magnitude_masks(state, 1.5)


def test_compress_state_decoded_is_what_the_bytes_say() -> None:
    w = weights(3)
    w["bn.running_var"] = torch.rand(16)
    payload, dec, stats = compress_state(w, [{"name": "prune", "amount": 0.3}, {"name": "int8"}])
    codec = build_pipeline([{"name": "prune", "amount": 0.3}, {"name": "int8"}])
    again = codec.decode(payload, CodecContext("down"))
    for n in w:
        assert torch.equal(dec[n], again[n])
    assert torch.equal(dec["bn.running_var"], w["bn.running_var"])
    assert stats["bytes"] == len(payload)


@pytest.mark.parametrize("kind", ["layer", "global", "filters", "channels", "filters_l2"])
def test_masks_match_torch_nn_utils_prune_with_ties(kind: str) -> None:
    """Equal magnitudes straddling the cut (quantized or repeated weights): torch.topk decides which are
    pruned, and the masks must be torch's, not another choice with the same count."""
    torch.manual_seed(1)
    net = Net()
    with torch.no_grad():
        for m in (net.conv, net.fc, net.head):
            m.weight.copy_(torch.randint(-3, 4, m.weight.shape).float() / 4)  # 7 levels: ties everywhere
            m.weight[1] = m.weight[0]  # equal filters / rows: ties among slice norms too
            m.weight[2] = -m.weight[0]
            m.weight[:, 1] = m.weight[:, 0]
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    amount = 0.3
    ours = _ours_after_torch_pruned(net, state, amount, kind)
    for name, mask in ours.items():
        mod = getattr(net, name.split(".")[0])
        assert torch.equal(mask, mod.weight_mask.bool()), name
    # the codec stage prunes the same elements
    _, out, _ = run(state, [{"name": "prune", "amount": amount, "scope": "global" if kind == "global" else "layer",
                             "structured": kind not in ("layer", "global"),
                             "dim": 1 if kind == "channels" else 0, "norm": 2 if kind == "filters_l2" else 1}],
                    compressible=ours)
    for name, mask in ours.items():
        assert torch.equal(out[name] != 0, mask & (state[name] != 0)), name
