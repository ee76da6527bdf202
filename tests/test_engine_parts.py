from __future__ import annotations

import numpy as np
import pytest
import torch

from fedslim.algorithms.aggregate import mean_delta
from fedslim.algorithms.base import scheduled_lr
from fedslim.config import DevicesConfig, DeviceTier, ServerOptimizerConfig, validate
from fedslim.devices import DevicePopulation, split_counts
from fedslim.engine.run import sample_cohort
from fedslim.engine.server_opt import ServerOptimizer
from fedslim.engine.task import ClientResult
from fedslim.rng import np_gen, stream_seed


def test_streams_are_independent_and_reproducible() -> None:
    assert stream_seed(1, "train", 3, 7) == stream_seed(1, "train", 3, 7)
    seeds = {stream_seed(1, p, r, c) for p in ("train", "sample") for r in range(5) for c in range(5)}
    assert len(seeds) == 50
    assert stream_seed(1, "train", 1, 2) != stream_seed(2, "train", 1, 2)
    a = np_gen(0, "sample", 4).random(3)
    np.testing.assert_array_equal(a, np_gen(0, "sample", 4).random(3))


def test_cohort_sampling() -> None:
    c = sample_cohort(0, 1, 50, 0.5)
    assert len(c) == 25 and len(set(c)) == 25 and c == sorted(c)
    assert c == sample_cohort(0, 1, 50, 0.5)
    assert c != sample_cohort(0, 2, 50, 0.5)
    assert sample_cohort(0, 1, 10, 1.0) == list(range(10))
    assert len(sample_cohort(0, 1, 10, 0.01)) == 1


def test_split_counts_sum_and_proportions() -> None:
    assert split_counts([1, 1, 1, 1, 1], 100) == [20] * 5
    assert sum(split_counts([0.3, 0.3, 0.4], 7)) == 7
    assert split_counts([2, 8], 10) == [2, 8]


def test_device_assignment_fixed_random_dynamic() -> None:
    tiers = [DeviceTier(name="a", share=1), DeviceTier(name="b", share=3)]
    fixed = DevicePopulation(DevicesConfig(tiers=tiers, assignment="fixed"), 8, 0)
    assert [fixed.tier(1, c).name for c in range(8)] == ["a"] * 2 + ["b"] * 6
    rnd = DevicePopulation(DevicesConfig(tiers=tiers, assignment="random"), 8, 0)
    assert sorted(rnd.assignment(1).tolist()) == [0, 0, 1, 1, 1, 1, 1, 1]
    assert (rnd.assignment(1) == rnd.assignment(5)).all()
    dyn = DevicePopulation(DevicesConfig(tiers=tiers, assignment="dynamic"), 200, 0)
    a1, a2 = dyn.assignment(1).copy(), dyn.assignment(2).copy()
    assert (a1 != a2).any()
    assert 0.15 < (a1 == 0).mean() < 0.35


def test_lr_schedules() -> None:
    cfg = validate({"train": {"optimizer": {"lr": 1.0}, "schedule": {"kind": "step", "gamma": 0.5, "step_size": 2}}})
    assert [scheduled_lr(cfg, r) for r in (1, 2, 3, 4, 5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    cfg = validate({"train": {"optimizer": {"lr": 1.0}, "schedule": {"kind": "exponential", "gamma": 0.9}}})
    assert scheduled_lr(cfg, 3) == pytest.approx(0.81)
    cfg = validate({"train": {"optimizer": {"lr": 1.0}, "schedule": {"kind": "multistep", "gamma": 0.1,
                                                                        "milestones": [3, 5]}}})
    assert [scheduled_lr(cfg, r) for r in (2, 3, 5)] == pytest.approx([1.0, 0.1, 0.01])


def _res(client: int, n: int, val: float) -> ClientResult:
    return ClientResult(client, 1, {"w": torch.full((2,), val), "c": torch.tensor(2, dtype=torch.long)}, n)


def test_mean_delta_weighted_and_unweighted() -> None:
    rs = [_res(0, 1, 1.0), _res(1, 3, 5.0)]
    assert torch.allclose(mean_delta(rs, weighted=True)["w"], torch.full((2,), 4.0))
    assert torch.allclose(mean_delta(rs, weighted=False)["w"], torch.full((2,), 3.0))
    assert mean_delta(rs)["c"].dtype == torch.long and int(mean_delta(rs)["c"]) == 2


def test_server_momentum_accumulates() -> None:
    opt = ServerOptimizer(ServerOptimizerConfig(name="sgd", lr=1.0, momentum=0.5))
    state = {"w": torch.zeros(1)}
    d = {"w": torch.ones(1)}
    s1 = opt.step(state, d, {"w"})
    s2 = opt.step(s1, d, {"w"})
    assert float(s1["w"]) == pytest.approx(1.0)
    assert float(s2["w"]) == pytest.approx(1.0 + 1.5)
    plain = ServerOptimizer(ServerOptimizerConfig())
    assert float(plain.step(state, d, {"w"})["w"]) == 1.0


@pytest.mark.parametrize("n,bs,sizes", [(129, 64, [64, 65]), (193, 64, [64, 64, 65]), (128, 64, [64, 64]),
                                        (1, 64, [1]), (65, 64, [65])])
def test_batches_fold_a_final_single_sample_into_the_previous_batch(n: int, bs: int, sizes: list[int]) -> None:
    from fedslim.engine.client import _batches

    out = _batches(n, bs, torch.Generator().manual_seed(0))
    assert [len(b) for b in out] == sizes
    # Every sample exactly once: the fold must not drop or duplicate a batch.
    assert sorted(torch.cat(out).tolist()) == list(range(n))


@pytest.mark.parametrize("mode", ["none", "flip", "crop_flip"])
def test_epoch_schedule_draws_in_the_order_of_a_step_by_step_update(mode: str) -> None:
    from fedslim.config import OptimizerConfig
    from fedslim.engine.client import _packed_to, epoch_schedule
    from fedslim.engine.task import LocalTrain

    tr = LocalTrain(2, 16, OptimizerConfig(name="sgd", lr=0.1), 0.1, augment=mode)
    gen = torch.Generator().manual_seed(5)
    got = epoch_schedule(50, tr, gen, image=True) + epoch_schedule(50, tr, gen, image=True)
    # The draws a step-by-step loop makes: each epoch's permutation, then per batch a flip per
    # sample and (crop_flip) row and column offsets.
    ref_gen = torch.Generator().manual_seed(5)
    ref = []
    for _ in range(2):
        perm = torch.randperm(50, generator=ref_gen)
        for i in range(0, 50, 16):
            idx = perm[i:i + 16]
            draws: tuple[torch.Tensor, ...] = ()
            if mode != "none":
                draws = (torch.rand(len(idx), generator=ref_gen) < 0.5,)
            if mode == "crop_flip":
                draws += (torch.randint(0, 9, (len(idx),), generator=ref_gen),
                          torch.randint(0, 9, (len(idx),), generator=ref_gen))
            ref.append((idx, draws))
    # The packed copy (what a GPU update receives) keeps every value and dtype.
    for sched in (got, _packed_to(got, "cpu")):
        assert len(sched) == len(ref) == 8
        for (idx, draws), (ridx, rdraws) in zip(sched, ref, strict=True):
            assert torch.equal(idx, ridx)
            assert len(draws) == len(rdraws)
            for d, r in zip(draws, rdraws, strict=True):
                assert d.dtype == r.dtype and torch.equal(d, r)
    assert all(draws == () for _, draws in epoch_schedule(50, tr, gen, image=False))


def test_model_spec_with_a_list_option_is_hashable_and_builds() -> None:
    # YAML gives mobilenetv2's hidden_channels as a list; backends key model buffers by spec.
    from fedslim.engine.task import ModelSpec

    chans = [8] * 16
    spec = ModelSpec.make("mobilenetv2", 10, (3, 32, 32), hidden_channels=chans)
    assert hash(spec) == hash(ModelSpec.make("mobilenetv2", 10, (3, 32, 32), hidden_channels=tuple(chans)))
    assert spec.with_(width=0.5).options == spec.options
    assert sum(p.numel() for p in spec.build().parameters()) > 0
