"""The vectorized backend computes what the serial backend computes, client by client."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import pytest
import torch

from fedslim import plugins
from fedslim.config import OptimizerConfig, validate
from fedslim.data.types import DatasetBundle, TensorData
from fedslim.engine import stacked
from fedslim.engine.backends import SerialBackend
from fedslim.engine.client import augment_draws
from fedslim.engine.run import Runner
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientResult, ClientTask, LocalTrain, ModelSpec
from fedslim.engine.vectorized import (
    VectorizedBackend,
    _build_schedule,
    augment_with,
    client_schedule,
    out_of_memory,
)
from fedslim.results import read_jsonl

SHAPE = (1, 16, 16)
# Client sizes chosen so that, at batch 16, clients take different numbers of steps, last batches are
# short (padding), and 33 = 2 * 16 + 1 folds a final one-sample batch into the one before.
SIZES = [70, 33, 16, 45, 9]


def make_store(sizes: list[int] = SIZES, classes: int = 4, seed: int = 0,
               shape: tuple[int, ...] = SHAPE) -> ClientStore:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    y = torch.randint(0, classes, (n,), generator=g)
    # Class-dependent means so that training does something non-trivial.
    x = torch.randn(n, *shape, generator=g, dtype=torch.get_default_dtype()) + y.reshape(-1, 1, 1, 1) * 0.5
    data = TensorData(x, y)
    bundle = DatasetBundle("toy", data, TensorData(x[:8], y[:8]), classes, shape)
    parts, lo = [], 0
    for s in sizes:
        parts.append(torch.arange(lo, lo + s))
        lo += s
    return ClientStore(bundle, parts)


def make_tasks(store: ClientStore, spec: ModelSpec, train: LocalTrain, **kw: object) -> list[ClientTask]:
    torch.manual_seed(7)
    state = {k: v.detach().clone() for k, v in spec.build().state_dict().items()}
    return [ClientTask(client=c, round=3, spec=spec, state=state, train=train, seed=100 + c, **kw)  # type: ignore[arg-type]
            for c in range(store.num_clients)]


def assert_close(serial: list[ClientResult], vec: list[ClientResult], rtol: float) -> None:
    """Each tensor's difference is small against the size of the client's whole update. (Against the
    tensor's own size is the wrong yardstick for a bias feeding a BatchNorm: its true gradient is 0,
    so both backends move it by rounding noise alone.)"""
    assert [r.client for r in serial] == [r.client for r in vec]
    for a, b in zip(serial, vec, strict=True):
        assert (a.num_samples, a.num_steps, a.extras) == (b.num_samples, b.num_steps, b.extras)
        assert set(a.delta) == set(b.delta)
        scale = torch.sqrt(sum((v.double() ** 2).sum() for v in a.delta.values() if v.is_floating_point()))
        assert scale > 0
        for k in a.delta:
            if not a.delta[k].is_floating_point():
                assert torch.equal(a.delta[k], b.delta[k]), k
                continue
            err = (a.delta[k].double() - b.delta[k].double()).norm() / scale
            assert err <= rtol, f"client {a.client} {k}: {err:.2e}"
        assert b.loss == pytest.approx(a.loss, rel=rtol * 10, abs=1e-12)


def sgd(lr: float = 0.05, **kw: object) -> OptimizerConfig:
    return OptimizerConfig(name="sgd", lr=lr, **kw)  # type: ignore[arg-type]


def adam(lr: float = 1e-3, **kw: object) -> OptimizerConfig:
    return OptimizerConfig(name="adam", lr=lr, **kw)  # type: ignore[arg-type]


# The two ways the vectorized backend trains a group: one stacked module (the default wherever the
# model's layers allow it) and vmap over functional_call (the fallback). Both must match serial.
PATHS = ["stacked", "vmap"]


def run_both(store: ClientStore, tasks: list[ClientTask], path: str = "stacked"
             ) -> tuple[list[ClientResult], list[ClientResult], VectorizedBackend]:
    serial = SerialBackend(store).run(tasks)
    vb = VectorizedBackend(store, stacked=path == "stacked")
    assert vb.path(tasks[0].spec) == path
    return serial, vb.run(tasks), vb


def test_schedules_differ_in_length_and_fold_a_single_sample() -> None:
    """Guards the other tests: the toy clients really exercise padding, masking and the fold."""
    store = make_store()
    tasks = make_tasks(store, ModelSpec.make("lenet5", 4, SHAPE), LocalTrain(1, 16, sgd(), 0.05))
    lengths = [len(client_schedule(t, store.num_samples(t.client), True)) for t in tasks]
    assert len(set(lengths)) >= 3
    sizes = [len(idx) for idx, _ in client_schedule(tasks[1], 33, True)]
    assert sizes == [16, 17]


def test_schedule_arrays_hold_each_clients_batches_and_draws_in_place() -> None:
    """The group's (step, client, slot) arrays, filled by scatters, against a plain loop over batches."""
    store = make_store()
    tasks = make_tasks(store, ModelSpec.make("lenet5", 4, SHAPE), LocalTrain(2, 16, sgd(), 0.05, augment="crop_flip"))
    per = [client_schedule(t, store.num_samples(t.client), True) for t in tasks]
    offsets = [0, 100, 200, 300, 400]
    sch = _build_schedule(per, offsets, "crop_flip", "cpu")
    S, G, B = sch.idx.shape
    assert (max(len(p) for p in per), len(per)) == (S, G) and B == 17  # the folded 16 + 1 batch
    for g, p in enumerate(per):
        assert sch.steps[g] == len(p)
        for s in range(S):
            m = len(p[s][0]) if s < len(p) else 0
            assert sch.rows[s][g] == m and float(sch.count[s, g]) == m
            assert torch.equal(sch.weight[s, g], (torch.arange(B) < m).float())
            assert (sch.idx[s, g, m:] == offsets[g]).all()  # padding reads the client's first row
            if m:
                b, (flip, dy, dx) = p[s]
                assert torch.equal(sch.idx[s, g, :m], b + offsets[g])
                assert sch.flip is not None and sch.dy is not None and sch.dx is not None
                assert torch.equal(sch.flip[s, g, :m], flip)
                assert torch.equal(sch.dy[s, g, :m], dy) and torch.equal(sch.dx[s, g, :m], dx)


@pytest.mark.parametrize("opt,extra", [
    (sgd(), {}),  # plain SGD: no momentum buffer, no weight decay
    (sgd(momentum=0.9, nesterov=True, weight_decay=1e-3), {}),
    (adam(weight_decay=1e-4), {"grad_clip": 0.5, "max_steps": 5}),
    (sgd(momentum=0.5), {"augment": "crop_flip"}),
])
@pytest.mark.parametrize("path", PATHS)
def test_lenet_float32_matches_serial(opt: OptimizerConfig, extra: dict, path: str) -> None:
    store = make_store()
    spec = ModelSpec.make("lenet5", 4, SHAPE)
    tasks = make_tasks(store, spec, LocalTrain(2, 16, opt, opt.lr, **extra))
    serial, vec, vb = run_both(store, tasks, path)
    assert vb.counts == {"vectorized": len(tasks), "serial": 0}
    assert_close(serial, vec, 1e-5)


_BN = ModelSpec.make("heterofl_cnn", 4, SHAPE, 0.25)  # BN with running statistics
_STATIC_BN = ModelSpec.make("heterofl_cnn", 4, SHAPE, 0.25, track_running_stats=False, scaler_rate=0.25)
_BN1D = ModelSpec.make("mlp", 4, SHAPE, norm="bn")
_GN = ModelSpec.make("heterofl_cnn", 4, SHAPE, 0.25, norm="gn")
_RESNET = ModelSpec.make("preresnet18", 4, SHAPE, 0.125)  # residual blocks, 1x1 shortcut convolutions
_MOBILENET = ModelSpec.make("mobilenetv2", 4, SHAPE, 0.125)  # depthwise (grouped) convolutions


@pytest.mark.parametrize("spec,opt", [
    *[(s, o) for s in (_BN, _STATIC_BN, _BN1D, _RESNET) for o in (sgd(momentum=0.9), adam())],
    (_GN, sgd(momentum=0.9)),
    # Not MobileNet with SGD at lr 0.05: on 16x16 inputs its last stages are 1x1 maps, and a client's
    # 6-sample last batch normalises over 6 values per channel; float64 rounding (a padded batch of 16
    # sums in another order) grows to 7e-4 there in 10 steps, for the vmap and stacked paths alike
    # (they agree with each other to 4e-10; measured at width 0.25).
    (_MOBILENET, adam()),
])
@pytest.mark.parametrize("path", PATHS)
def test_batchnorm_models_match_serial_in_float64(float64: None, spec: ModelSpec, opt: OptimizerConfig,
                                                  path: str) -> None:
    """BatchNorm models are checked in float64: a BN network amplifies float32 rounding (serial
    against serial with a 1e-7 perturbation of the start weights differs by 1e-2 after five steps),
    so float32 agreement would say little. In float64 only the algorithm can make them differ."""
    store = make_store()
    tasks = make_tasks(store, spec, LocalTrain(2, 16, opt, opt.lr))
    serial, vec, vb = run_both(store, tasks, path)
    assert vb.counts["vectorized"] == len(tasks)
    assert_close(serial, vec, 1e-9)
    tracked = [k for k in serial[0].delta if k.endswith("num_batches_tracked")]
    assert bool(tracked) == (dict(spec.options).get("norm", "bn") == "bn"
                             and dict(spec.options).get("track_running_stats", True))
    for key in tracked:
        assert [int(r.delta[key]) for r in vec] == [r.num_steps for r in serial]


_DROPOUT = [
    ModelSpec.make("lenet5", 4, SHAPE, dropout=0.3),
    ModelSpec.make("mlp", 4, SHAPE, norm="bn", dropout=0.5),  # BatchNorm after a dropout layer's draws
    ModelSpec.make("heterofl_cnn", 4, SHAPE, 0.25, dropout=0.2),
    ModelSpec.make("alexnet", 4, (3, 32, 32), 0.125),  # two dropout layers at its default p = 0.5
]


@pytest.mark.parametrize("spec", _DROPOUT, ids=lambda s: s.name)
@pytest.mark.parametrize("opt", [sgd(momentum=0.9), adam()], ids=["sgd", "adam"])
def test_dropout_models_match_serial_in_float64(float64: None, spec: ModelSpec, opt: OptimizerConfig) -> None:
    """The stacked path draws each client's dropout masks as serial training does (same seed, same
    call, its real samples only). In float64 only rounding separates them then; one mask drawn from
    the wrong state or over the padding would differ by the size of the update itself."""
    store = make_store(shape=spec.input_shape)
    tasks = make_tasks(store, spec, LocalTrain(2, 16, opt, opt.lr))
    serial = SerialBackend(store).run(tasks)
    vb = VectorizedBackend(store)
    assert vb.path(spec) == "stacked"
    before = torch.get_rng_state()
    vec = vb.run(tasks)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left as it was found
    assert vb.counts == {"vectorized": len(tasks), "serial": 0}
    assert_close(serial, vec, 1e-9)


@pytest.mark.parametrize("spec", [_BN, _BN1D, _RESNET], ids=lambda s: s.name)
def test_full_batches_take_the_unmasked_batchnorm_and_still_match_serial(float64: None, spec: ModelSpec) -> None:
    """Clients of 32, 48 and 64 samples at batch 16: every step of several clients is full, so
    BatchNorm runs unmasked there (the other tests mostly pad)."""
    store = make_store(sizes=[32, 48, 64])
    tasks = make_tasks(store, spec, LocalTrain(2, 16, adam(), 1e-3))
    calls: list[bool] = []
    inner = stacked.StackedBatchNorm._unmasked

    def spy(self: stacked.StackedBatchNorm, x: torch.Tensor, k: int) -> torch.Tensor:
        calls.append(k)
        return inner(self, x, k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stacked.StackedBatchNorm, "_unmasked", spy)
        serial, vec, vb = run_both(store, tasks, "stacked")
    assert calls and max(calls) == 3
    assert_close(serial, vec, 1e-9)


@pytest.mark.parametrize("path", PATHS)
def test_label_and_param_masks_per_client(float64: None, path: str) -> None:
    store = make_store()
    spec = ModelSpec.make("lenet5", 4, SHAPE)
    tasks = make_tasks(store, spec, LocalTrain(1, 16, sgd(momentum=0.9), 0.05))
    g = torch.Generator().manual_seed(1)
    for t in tasks:
        t.label_mask = torch.rand(4, generator=g) < 0.7
        t.param_masks = {k: (torch.rand(v.shape, generator=g) < 0.5).to(v.dtype) for k, v in t.state.items()
                         if k.endswith("weight")}
    serial, vec, vb = run_both(store, tasks, path)
    assert vb.counts["vectorized"] == len(tasks)
    assert_close(serial, vec, 1e-9)
    for t, r in zip(tasks, vec, strict=True):
        assert t.param_masks is not None
        for k, m in t.param_masks.items():
            assert ((t.state[k] + r.delta[k])[m == 0] == 0).all()  # pruned weights stay pruned


def test_augment_with_flips_and_crops_each_sample_by_its_own_draws() -> None:
    x = torch.randn(10, 3, 12, 12)
    g = torch.Generator().manual_seed(5)
    for mode in ("flip", "crop_flip"):
        draws = augment_draws(10, mode, g)
        got = augment_with(x, mode, *draws)
        for i in range(10):
            ref = x[i].flip(2) if draws[0][i] else x[i]
            if mode == "crop_flip":
                dy, dx = int(draws[1][i]), int(draws[2][i])
                ref = torch.nn.functional.pad(ref, (4, 4, 4, 4))[:, dy:dy + 12, dx:dx + 12]
            assert torch.equal(got[i], ref)
        assert 0 < int(draws[0].sum()) < 10  # both branches taken


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_of_a_cuda_batch_equals_the_cpu_one() -> None:
    """The draws are made on the CPU (a CUDA tensor cannot be drawn from a CPU generator) and moved."""
    x = torch.randn(10, 3, 12, 12)
    for mode in ("flip", "crop_flip"):
        draws = augment_draws(10, mode, torch.Generator().manual_seed(5))
        on_cpu = augment_with(x, mode, *draws)
        on_gpu = augment_with(x.cuda(), mode, *(d.cuda() for d in draws))
        assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)


def test_mixed_cohort_keeps_task_order_and_falls_back_once() -> None:
    """Different specs form separate groups, evaluate tasks and (off the stacked path) dropout models
    run serially, said once, and every result comes back at its task's position."""
    store = make_store()
    tr = LocalTrain(1, 16, sgd(), 0.05)
    a = make_tasks(store, ModelSpec.make("lenet5", 4, SHAPE), tr)
    b = make_tasks(store, ModelSpec.make("lenet5", 4, SHAPE, 0.5), tr)
    d = make_tasks(store, ModelSpec.make("lenet5", 4, SHAPE, dropout=0.3), tr)
    ev = [ClientTask(client=0, round=3, spec=a[0].spec, state=a[0].state, kind="evaluate")]
    tasks = [a[0], b[1], d[0], a[1], b[2], ev[0], d[1], a[2]]
    serial = SerialBackend(store).run(tasks)
    vb = VectorizedBackend(store, stacked=False)  # vmap cannot replay per-client dropout masks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vec = vb.run(tasks)
        vec2 = vb.run(tasks)
    said = [w for w in caught if "dropout" in str(w.message)]
    assert len(said) == 1 and "stacked path" in str(said[0].message)
    assert vb.counts == {"vectorized": 10, "serial": 6}
    for out in (vec, vec2):
        assert [r.client for r in out] == [t.client for t in tasks]
        # dropout and evaluate tasks ran the serial procedure itself: identical
        for i in (2, 5, 6):
            assert out[i].loss == serial[i].loss
            assert all(torch.equal(out[i].delta[k], serial[i].delta[k]) for k in serial[i].delta)
        assert_close([serial[i] for i in (0, 1, 3, 4, 7)], [out[i] for i in (0, 1, 3, 4, 7)], 1e-5)


def test_registered_and_auto_never_picks_vectorized_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"vectorized", "ray", "auto"} <= set(plugins.BACKENDS.names())
    # One usable core: nothing to parallelize; on a CPU vectorized is no faster than serial there.
    monkeypatch.setattr("fedslim.engine.process_backend.usable_cpus", lambda: 1)
    auto = plugins.BACKENDS.get("auto")(make_store(), device="cpu")
    assert type(auto) is SerialBackend


@pytest.mark.parametrize("threads,cpus,reason", [(2, 2, "engine.threads=2"), (None, 1, "one usable CPU core")])
def test_run_banner_says_why_auto_ran_serial(tiny_cfg: dict, monkeypatch: pytest.MonkeyPatch,
                                             threads: int | None, cpus: int, reason: str) -> None:
    monkeypatch.setattr("fedslim.engine.process_backend.usable_cpus", lambda: cpus)
    out = io.StringIO()
    cfg = {**tiny_cfg, "federation": {"rounds": 1, "participation": 0.5},
           "engine": {"progress": False, "backend": "auto", "threads": threads}}
    Runner(validate(cfg), out=out).run()
    banner = next(line for line in out.getvalue().splitlines() if line.startswith("backend "))
    assert banner.startswith("backend serial on cpu") and f"(auto: {reason}" in banner


@pytest.mark.parametrize("model", [{"name": "lenet5"}, {"name": "lenet5", "options": {"dropout": 0.3}}],
                         ids=["lenet5", "lenet5-dropout"])
def test_runner_vectorized_matches_serial(tiny_cfg: dict, tmp_path: Path, model: dict) -> None:
    finals = {}
    for backend in ("serial", "vectorized"):
        cfg = {**tiny_cfg, "name": backend, "engine": {"progress": False, "backend": backend}}
        cfg["model"] = model
        runner = Runner(validate(cfg), out=open("/dev/null", "w"))  # noqa: SIM115
        finals[backend] = runner.run()["final"]["global"]
        rows = read_jsonl(runner.run_dir / "metrics.jsonl")
        finals[backend + "_loss"] = [r["train_loss"] for r in rows]
        if backend == "vectorized":
            assert isinstance(runner.backend, VectorizedBackend)
            assert runner.backend.counts["vectorized"] > 0  # the groups were batched, not run serially
    assert finals["vectorized"]["acc"] == pytest.approx(finals["serial"]["acc"], abs=0.01)
    assert finals["vectorized"]["loss"] == pytest.approx(finals["serial"]["loss"], rel=1e-4)
    assert finals["vectorized_loss"] == pytest.approx(finals["serial_loss"], rel=1e-4)


def record_group_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the groups the vectorized backend trains from now on, in order."""
    sizes: list[int] = []
    inner = VectorizedBackend._train_group

    def spy(self: VectorizedBackend, group: list[ClientTask]) -> list[ClientResult]:
        sizes.append(len(group))
        return inner(self, group)

    monkeypatch.setattr(VectorizedBackend, "_train_group", spy)
    return sizes


def test_max_group_splits_a_group_into_batched_steps_of_at_most_that_many(monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store()
    tasks = make_tasks(store, ModelSpec.make("lenet5", 4, SHAPE), LocalTrain(1, 16, adam(), 1e-3))
    cfg = validate({"engine": {"backend": "vectorized", "max_group": 2}})
    vb = VectorizedBackend(store, cfg=cfg)
    sizes = record_group_sizes(monkeypatch)
    vec = vb.run(tasks)
    assert sizes == [2, 2, 1]
    assert_close(SerialBackend(store).run(tasks), vec, 1e-5)
    with pytest.raises(ValueError, match="max_group"):
        validate({"engine": {"max_group": 0}})


def test_allocation_failures_reported_as_runtime_errors_count_as_out_of_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator's own refusal, whatever its wording
    except RuntimeError as e:
        cpu_refusal: BaseException = e
    assert out_of_memory(cpu_refusal)
    assert out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert out_of_memory(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"))
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))

    store = make_store()
    tasks = make_tasks(store, ModelSpec.make("lenet5", 4, SHAPE), LocalTrain(1, 16, adam(), 1e-3))
    inner = VectorizedBackend._train_group

    def cudnn_fits_two(self: VectorizedBackend, group: list[ClientTask]) -> list[ClientResult]:
        if len(group) > 2:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED (simulated)")
        return inner(self, group)

    monkeypatch.setattr(VectorizedBackend, "_train_group", cudnn_fits_two)
    vb = VectorizedBackend(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vec = vb.run(tasks)
    assert vb.max_group == 2
    assert_close(SerialBackend(store).run(tasks), vec, 1e-5)

    def broken(self: VectorizedBackend, group: list[ClientTask]) -> list[ClientResult]:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(VectorizedBackend, "_train_group", broken)
    with pytest.raises(RuntimeError, match="mat1"):
        VectorizedBackend(store).run(tasks)


def test_a_group_that_runs_out_of_memory_is_halved_and_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    store = make_store()
    tasks = make_tasks(store, ModelSpec.make("lenet5", 4, SHAPE), LocalTrain(1, 16, adam(), 1e-3))
    vb = VectorizedBackend(store)
    tried: list[int] = []
    inner = VectorizedBackend._train_group

    def fits_two(self: VectorizedBackend, group: list[ClientTask]) -> list[ClientResult]:
        tried.append(len(group))
        if len(group) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return inner(self, group)

    monkeypatch.setattr(VectorizedBackend, "_train_group", fits_two)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vec = vb.run(tasks)
        vb.run(tasks)
    assert tried == [5, 2, 2, 1, 2, 2, 1]  # the second round starts at the size that fitted
    assert vb.max_group == 2 and vb.counts["vectorized"] == 2 * len(tasks)
    said = [w for w in caught if "out of memory" in str(w.message)]
    assert len(said) == 1 and "at most 2" in str(said[0].message)
    assert_close(SerialBackend(store).run(tasks), vec, 1e-5)

    def never_fits(self: VectorizedBackend, group: list[ClientTask]) -> list[ClientResult]:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(VectorizedBackend, "_train_group", never_fits)
    with pytest.raises(torch.OutOfMemoryError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        VectorizedBackend(store).run(tasks)
