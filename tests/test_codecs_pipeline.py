"""Pipelines: wire sizes, exact passthrough, NaN errors, top-k error feedback, config errors, ratios."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from fedslim.codecs import (
    CodecContext,
    CodecError,
    ExactCodec,
    Pipeline,
    build_pipeline,
    coded_record_size,
    float32_size,
    pack_exact,
    payload_size,
    ratio_vs_float32,
    raw_record_size,
    weight_names,
)
from fedslim.config import ConfigError, validate
from fedslim.registry import CODECS


def ctx(names, client=0, gen=None, direction="up", round_=0):
    return CodecContext(direction, client, round_, frozenset(names), gen)


def ref_varint_size(indices: list[int]) -> int:
    n, prev = 0, -1
    for i in indices:
        g, prev = i - prev - 1, i
        n += max(1, (g.bit_length() + 6) // 7)
    return n


class LeNet(nn.Module):
    """~62k parameters of conv/linear weights, with BatchNorm state that must travel exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(400, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)


def model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = LeNet()
    net.bn1.running_mean.uniform_(-1, 1)
    net.bn1.running_var.uniform_(0.5, 2)
    net.bn1.num_batches_tracked += 17
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------- wire sizes

def test_hand_computed_sizes() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, generator=g)
    c = build_pipeline([{"name": "quantize", "bits": 8}])
    # 5 payload + (2 + 1 name + 2 + 8 shape + 1 mode) + 1 bits + 4 scale + 32 codes
    assert len(c.encode({"w": w}, ctx(["w"]))) == 5 + 14 + 1 + 4 + 32 == 56
    c = build_pipeline([{"name": "prune", "amount": 0.75}, {"name": "int8"}])
    # 8 survivors: dense 32 vs bitmap 4 + 4 + 8 = 16 vs varint 4 + 8 + 8 = 20 -> bitmap
    assert len(c.encode({"w": w}, ctx(["w"]))) == 5 + 14 + 1 + 4 + 4 + 4 + 8 == 40
    assert c.last_stats["tensors"]["w"]["mode"] == "bitmap"
    # Exact tensors: header + raw bytes in their own dtype.
    t = {"bn.running_mean": torch.randn(5), "bn.num_batches_tracked": torch.tensor(3)}
    assert len(c.encode(t, ctx([]))) == 5 + (2 + 15 + 2 + 4 + 1 + 20) + (2 + 22 + 2 + 0 + 1 + 8)


CONFIGS = [
    [{"name": "quantize", "bits": b}] for b in (1, 2, 3, 5, 8, 12, 16)
] + [
    [{"name": "quantize", "bits": 3, "scheme": "asymmetric", "granularity": "channel"}],
    [{"name": "quantize", "bits": 6, "granularity": "channel", "rounding": "stochastic"}],
    [{"name": "prune", "amount": 0.5}, {"name": "int8"}],
    [{"name": "prune", "amount": 0.95, "scope": "global"}, {"name": "quantize", "bits": 4}],
    [{"name": "prune", "amount": 0.5, "structured": True}, {"name": "quantize", "bits": 4,
                                                            "scheme": "asymmetric"}],
    [{"name": "int8"}, {"name": "prune", "amount": 0.3}],
    [{"name": "topk", "ratio": 0.01}],
    [{"name": "topk", "ratio": 0.2, "scope": "global"}, {"name": "quantize", "bits": 2}],
    [{"name": "prune", "amount": 0.4}],
]


@pytest.mark.parametrize("stages", CONFIGS, ids=lambda s: "+".join(f"{d['name']}" for d in s))
def test_encoded_size_is_the_documented_formula(stages) -> None:
    state = model_state()
    names = weight_names(state)
    codec = build_pipeline(stages)
    payload = codec.encode(state, ctx(names, gen=torch.Generator().manual_seed(1)))
    decoded = codec.decode(payload, ctx(names))
    sizes = []
    for name, t in state.items():
        info = codec.last_stats["tensors"][name]
        if name not in names:
            sizes.append(raw_record_size(name, tuple(t.shape), t.element_size()))
            continue
        nz = torch.nonzero(decoded[name].reshape(-1)).flatten().tolist()
        assert info["nnz"] == len(nz)
        groups = info["groups"]
        options = {pos: coded_record_size(name, tuple(t.shape), positions=pos, values=info["values"],
                                          bits=info["bits"], nnz=len(nz), groups=groups,
                                          varint_bytes=ref_varint_size(nz))
                   for pos in ("dense", "bitmap", "varint")}
        if len(nz) < t.numel() and info["values"] in ("sign", "asym"):
            del options["dense"]  # zeros are not on these grids
        assert info["mode"] == min(options, key=options.get)  # the smallest coding is chosen
        assert info["bytes"] == options[info["mode"]]
        sizes.append(options[info["mode"]])
    assert len(payload) == payload_size(sizes)
    assert len(payload) < len(pack_exact(state))


def test_realistic_model_ratios_and_every_width_beats_float32() -> None:
    state = model_state()
    assert 60_000 <= sum(t.numel() for n, t in state.items() if n in weight_names(state)) <= 65_000
    exact = len(ExactCodec().encode(state, ctx([])))
    assert exact == float32_size(state)

    def ratio(stages):
        codec = build_pipeline(stages)
        payload = codec.encode(state, ctx(weight_names(state), gen=torch.Generator().manual_seed(0)))
        assert codec.last_stats["ratio_vs_float32"] == pytest.approx(ratio_vs_float32(state, payload))
        return exact / len(payload)

    assert ratio([{"name": "quantize", "bits": 8}]) >= 3.9
    assert ratio([{"name": "quantize", "bits": 4}]) >= 7.5
    assert ratio([{"name": "prune", "amount": 0.5}, {"name": "int8"}]) >= 5
    previous = float("inf")
    for bits in range(1, 17):
        r = ratio([{"name": "quantize", "bits": bits, "scheme": "asymmetric"}])
        assert 1 < r < previous  # smaller than float32 at every width, and more bits cost more
        previous = r


def test_encode_decode_is_fast_on_a_60k_model() -> None:
    state = model_state()
    names = weight_names(state)
    codec = build_pipeline([{"name": "prune", "amount": 0.5}, {"name": "quantize", "bits": 5,
                                                              "rounding": "stochastic"}])
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        codec.decode(codec.encode(state, ctx(names, gen=torch.Generator().manual_seed(0))), ctx(names))
        best = min(best, time.perf_counter() - t0)
    assert best < 0.05, f"{best * 1e3:.1f} ms"


# ---------------------------------------------------------------- exactness and errors

def test_non_compressible_tensors_round_trip_bit_exactly() -> None:
    state = model_state()
    state.update({"x.f64": torch.randn(3, 2, dtype=torch.float64), "x.bf16": torch.randn(4).bfloat16(),
                  "x.i32": torch.arange(-3, 3, dtype=torch.int32), "x.bool": torch.tensor([True, False]),
                  "x.tiny_scalar": torch.tensor(1e-30), "x.u8": torch.arange(7, dtype=torch.uint8)})
    names = weight_names(state) | {"x.i32"}  # an integer tensor listed as compressible still travels exact
    codec = build_pipeline([{"name": "quantize", "bits": 2}])
    out = codec.decode(codec.encode(state, ctx(names)), ctx(names))
    assert list(out) == list(state)
    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.int16) if t.dtype == torch.bfloat16 else t

    for n, t in state.items():
        assert out[n].dtype == t.dtype and out[n].shape == t.shape
        if n not in weight_names(state):
            assert torch.equal(bits(out[n]), bits(t)), n
    assert out["bn1.num_batches_tracked"].item() == 17
    assert codec.last_stats["tensors"]["bn1.running_var"]["mode"] == "raw"


def test_compressible_non_float32_dtypes_keep_their_dtype() -> None:
    t = {"h": torch.randn(6, 5).half(), "d": torch.randn(6, 5, dtype=torch.float64),
         "b": torch.randn(6, 5).bfloat16()}
    codec = build_pipeline([{"name": "quantize", "bits": 8}])
    out = codec.decode(codec.encode(t, ctx(t)), ctx(t))
    for n, x in t.items():
        assert out[n].dtype == x.dtype
        assert (out[n].double() - x.double()).abs().max() <= x.double().abs().max() / 127 * 0.51 + 1e-2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("stages", [[], [{"name": "int8"}], [{"name": "topk", "ratio": 0.1}]])
def test_nan_or_inf_is_an_error_naming_client_and_tensor(bad: float, stages) -> None:
    state = model_state()
    state["fc2.weight"][3, 4] = bad
    codec = build_pipeline(stages)
    with pytest.raises(CodecError, match=r"client 7 .*'fc2\.weight'.*diverged; try a lower train\.optimizer\.lr"):
        codec.encode(state, ctx(weight_names(state), client=7))
    state = model_state()
    state["bn1.running_var"][0] = bad  # exact tensors are checked too
    with pytest.raises(CodecError, match=r"server \(to client 2\).*'bn1\.running_var'"):
        codec.encode(state, ctx(weight_names(state), client=2, direction="down"))


def test_decode_rejects_garbage() -> None:
    codec = build_pipeline([{"name": "int8"}])
    payload = codec.encode({"w": torch.randn(3, 3)}, ctx(["w"]))
    with pytest.raises(CodecError, match="trailing"):
        codec.decode(payload + b"\x00", ctx(["w"]))
    with pytest.raises(CodecError, match="version"):
        codec.decode(b"\x09" + payload[1:], ctx(["w"]))


# ---------------------------------------------------------------- top-k error feedback

def test_topk_error_feedback_carries_the_residual_per_client() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [{"w": torch.randn(50, 40, generator=g), "b": torch.randn(40, generator=g)} for _ in range(6)]
    codec = build_pipeline([{"name": "topk", "ratio": 0.05}, {"name": "quantize", "bits": 4}])
    c0 = ctx(["w"], client=0, gen=g)
    sent = torch.zeros(50, 40)
    for x in xs:
        out = codec.decode(codec.encode(x, c0), c0)
        assert int((out["w"] != 0).sum()) <= 100
        assert torch.equal(out["b"], x["b"])
        sent += out["w"]
    # Telescoping: everything sent plus what is still held back is everything that came in.
    residual = codec.state_dict()["stages"][0]["residuals"][0]["w"]
    total = sum(x["w"] for x in xs)
    assert torch.allclose(sent + residual, total, atol=1e-4)
    assert residual.abs().sum() > 0
    # Another client starts from no residual: its first payload is that of a fresh codec.
    fresh = build_pipeline([{"name": "topk", "ratio": 0.05}, {"name": "quantize", "bits": 4}])
    assert codec.encode(xs[0], ctx(["w"], client=1)) == fresh.encode(xs[0], ctx(["w"], client=1))
    # Without feedback nothing is kept and the second payload equals the first.
    nofb = build_pipeline([{"name": "topk", "ratio": 0.05, "error_feedback": False}])
    assert nofb.encode(xs[0], c0) == nofb.encode(xs[0], c0)
    assert nofb.state_dict()["stages"][0]["residuals"] == {}


def test_topk_residual_survives_state_dict_round_trip(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    xs = [{"w": torch.randn(30, 30, generator=g)} for _ in range(3)]
    spec = [{"name": "topk", "ratio": 0.1}]
    a = build_pipeline(spec)
    for client in (0, 3):
        a.encode(xs[0], ctx(["w"], client=client))
        a.encode(xs[1], ctx(["w"], client=client))
    torch.save(a.state_dict(), tmp_path / "codec.pt")
    b = build_pipeline(spec)
    b.load_state_dict(torch.load(tmp_path / "codec.pt"))
    for client in (0, 3):
        assert a.encode(xs[2], ctx(["w"], client=client)) == b.encode(xs[2], ctx(["w"], client=client))
    # A restored codec differs from a fresh one: the residual matters.
    assert b.encode(xs[2], ctx(["w"], client=0)) != build_pipeline(spec).encode(xs[2], ctx(["w"], client=0))


def test_topk_residual_of_a_reshaped_tensor_is_dropped() -> None:
    codec = build_pipeline([{"name": "topk", "ratio": 0.1}])
    codec.encode({"w": torch.randn(10, 10)}, ctx(["w"]))
    small = {"w": torch.randn(5, 10)}  # the same client now holds a narrower sub-model
    assert codec.encode(small, ctx(["w"])) == build_pipeline([{"name": "topk", "ratio": 0.1}]).encode(
        small, ctx(["w"]))


def test_topk_keeps_exactly_k_largest() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    codec = build_pipeline([{"name": "topk", "ratio": 0.03, "error_feedback": False}])
    out = codec.decode(codec.encode({"x": x}, ctx(["x"])), ctx(["x"]))["x"]
    kept = out != 0
    assert int(kept.sum()) == 30
    assert torch.equal(out[kept], x[kept])
    assert x[~kept].abs().max() <= x[kept].abs().min()
    assert codec.last_stats["nominal_sparsity"] == pytest.approx(0.97)


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("specs,message", [
    ([{"name": "quantize", "bits": 32}], "codec.up.0.bits: must be an integer from 1 to 16 (got 32)"),
    ([{"name": "quantize", "bits": 0}], "codec.up.0.bits: must be an integer from 1 to 16 (got 0)"),
    ([{"name": "quantize", "bits": "x"}], "codec.up.0.bits: must be an integer from 1 to 16 (got 'x')"),
    ([{"name": "quantize", "bits": 4.5}], "codec.up.0.bits: must be an integer from 1 to 16 (got 4.5)"),
    ([{"name": "quantize", "bits": True}], "codec.up.0.bits: must be"),
    ([{"name": "quantize", "bit": 4}], "codec.up.0.bit: unknown key (did you mean 'bits'?); valid keys here: "
                                       "bits, rounding, scheme, granularity, name"),
    ([{"name": "int8"}, {"name": "quantise"}], "codec.up.1.name: unknown codec 'quantise' (did you mean "
                                               "'quantize'?); allowed: int8, prune, quantize, topk"),
    ([{"name": "prune"}], "codec.up.0.amount: required"),
    ([{"name": "prune", "amount": 1.5}], "codec.up.0.amount: must be at least 0 and below 1 (1 would remove "
                                          "every weight the stage compresses) (got 1.5)"),
    ([{"name": "prune", "amount": 1}], "codec.up.0.amount: must be at least 0 and below 1"),
    ([{"name": "prune", "amount": 1, "structured": True}], "codec.up.0.amount: must be at least 0 and below 1"),
    ([{"name": "prune", "amount": 0.5, "scope": "global", "structured": True}],
     "codec.up.0: scope 'global' works with unstructured pruning only"),
    ([{"name": "quantize", "rounding": "up"}], "codec.up.0.rounding: "),
    ([{"name": "topk", "ratio": 0}], "codec.up.0.ratio: must be in (0, 1] (got 0)"),
    ([{"name": "int8", "bits": 4}], "codec.up.0.bits: unknown key; valid keys here: name"),
    ([{"bits": 4}], "codec.up.0: missing 'name'"),
    ([{"name": "prune", "amount": True}], "codec.up.0.amount: must be a number, not a boolean"),
    ([{"name": 3}], "codec.up.0.name: must be a string"),
])
def test_config_errors_name_the_field(specs, message) -> None:
    with pytest.raises(ValueError) as e:
        build_pipeline(specs, field="codec.up")
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("specs,message", [
    ([{"name": "prune", "amout": 0.5}], "codec.up.0.amout: unknown key (did you mean 'amount'?); valid keys here: "
                                        "amount, scope, structured, dim, norm, name"),
    ([{"name": "topk", "ration": 0.1}], "codec.up.0.ration: unknown key (did you mean 'ratio'?); valid keys here: "
                                        "ratio, error_feedback, scope, name"),
    ([{"name": "int8"}, {"name": "prune", "amount": 0.5, "scpe": "global"}],
     "codec.up.1.scpe: unknown key (did you mean 'scope'?)"),
])
def test_typo_of_a_required_key_is_an_unknown_key_not_a_missing_one(specs, message) -> None:
    # The misspelt key also leaves the required one missing; the typo is what the user must see.
    with pytest.raises(ValueError) as e:
        build_pipeline(specs, field="codec.up")
    assert str(e.value).startswith(message), str(e.value)
    assert "required" not in str(e.value)


def test_typo_of_a_required_key_through_the_config() -> None:
    raw = {"codec": {"down": [{"name": "prune", "amout": 0.5}, {"name": "int8"}]}}
    with pytest.raises(ConfigError) as e:
        validate(raw)
    assert str(e.value).startswith("codec.down.0.amout: unknown key (did you mean 'amount'?)"), str(e.value)


REQUANTIZE = "it would quantize already-quantized values again; a pipeline takes one quantizing stage " \
             "(quantize or int8), and after it only prune, or topk with error_feedback: false"


@pytest.mark.parametrize("specs,message", [
    ([{"name": "quantize", "bits": 4}, {"name": "quantize", "bits": 2}],
     f"codec.up.1: quantize cannot follow quantize (codec.up.0): {REQUANTIZE}"),
    ([{"name": "quantize", "bits": 4}, {"name": "int8"}], f"codec.up.1: int8 cannot follow quantize (codec.up.0): "
                                                          f"{REQUANTIZE}"),
    ([{"name": "int8"}, {"name": "quantize", "bits": 4}], f"codec.up.1: quantize cannot follow int8 (codec.up.0): "
                                                          f"{REQUANTIZE}"),
    ([{"name": "int8"}, {"name": "prune", "amount": 0.5}, {"name": "int8"}],
     f"codec.up.2: int8 cannot follow int8 (codec.up.0): {REQUANTIZE}"),
    ([{"name": "quantize", "bits": 4}, {"name": "topk", "ratio": 0.1}],
     "codec.up.1: topk cannot follow quantize (codec.up.0): its error feedback adds a float residual to the "
     "quantized values, which then travel as float32 (move topk before the quantizer); a pipeline takes one "
     "quantizing stage"),
])
def test_stages_that_undo_a_quantizer_are_refused(specs, message) -> None:
    with pytest.raises(ValueError) as e:
        build_pipeline(specs, field="codec.up")
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("specs", [
    [{"name": "prune", "amount": 0.5}, {"name": "int8"}],
    [{"name": "int8"}, {"name": "prune", "amount": 0.5}],
    [{"name": "topk", "ratio": 0.1}, {"name": "quantize", "bits": 4}],
    [{"name": "quantize", "bits": 4}, {"name": "topk", "ratio": 0.1, "error_feedback": False}],
    [{"name": "prune", "amount": 0.5}, {"name": "quantize", "bits": 4}, {"name": "prune", "amount": 0.2}],
])
def test_one_quantizer_with_sparsifiers_around_it_is_accepted(specs) -> None:
    assert isinstance(build_pipeline(specs, field="codec.up"), Pipeline)


def test_a_quantizer_followed_by_topk_with_error_feedback_really_loses_the_grid() -> None:
    # Why quantize -> topk(error_feedback) is refused: from the second encode on it sends float32.
    from fedslim.codecs import Quantize, TopK

    codec = Pipeline([Quantize(bits=4), TopK(ratio=0.1)])
    kinds = []
    for r in range(2):
        codec.encode({"w": torch.randn(50, 50, generator=torch.Generator().manual_seed(r))}, ctx(["w"]))
        kinds.append(codec.last_stats["tensors"]["w"]["values"])
    assert kinds == ["sym", "float32"]


def test_pipeline_from_config_and_registry() -> None:
    assert isinstance(build_pipeline([], "codec.down"), ExactCodec)
    assert set(CODECS.names()) >= {"quantize", "prune", "topk", "int8"}
    # The engine passes CodecStage.model_dump(): name plus the stage's own fields.
    c = build_pipeline([{"name": "prune", "amount": 0.5, "scope": "layer", "structured": False},
                        {"name": "int8"}], "codec.down")
    assert isinstance(c, Pipeline) and [s.name for s in c.stages] == ["prune", "int8"]
    with pytest.raises(ValueError, match="stages"):
        c.load_state_dict({"stages": [{}]})


def test_topk_error_feedback_is_refused_on_the_downlink() -> None:
    # The downlink encodes the global model, not an update: with error feedback every weight top-k drops
    # is added again to the next round's model, so a model sent twice arrives further from the truth.
    with pytest.raises(ValueError) as e:
        build_pipeline([{"name": "prune", "amount": 0.1}, {"name": "topk", "ratio": 0.1}], field="codec.down",
                       downlink=True)
    assert str(e.value).startswith("codec.down.1: topk cannot run on the downlink this way: error_feedback "), \
        str(e.value)
    assert "set error_feedback: false" in str(e.value)
    with pytest.raises(ConfigError, match="codec.down.0: topk cannot run on the downlink"):
        validate({"codec": {"down": [{"name": "topk", "ratio": 0.1}]}})
    assert isinstance(build_pipeline([{"name": "topk", "ratio": 0.1, "error_feedback": False}], "codec.down",
                                     downlink=True), Pipeline)
    assert isinstance(build_pipeline([{"name": "topk", "ratio": 0.1}], "codec.up"), Pipeline)

