"""Sizing batched groups to the device's free memory (fedslim.engine.memory)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from test_backend_vectorized import SHAPE, adam, assert_close, make_store, make_tasks, record_group_sizes
from torch import nn

from fedslim.engine import memory
from fedslim.engine.backends import SerialBackend
from fedslim.engine.task import LocalTrain, ModelSpec
from fedslim.engine.vectorized import MEMORY_SHARE, VectorizedBackend


def test_activation_count_is_every_leaf_output_per_sample_and_touches_no_state() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Dropout(0.5), nn.Linear(3, 2))
    model.train()
    bn = model[1]
    assert isinstance(bn, nn.BatchNorm1d)
    stats = bn.running_mean.clone()
    rng = torch.get_rng_state()
    assert memory.activation_elements_per_sample(model, (4,)) == 3 + 3 + 3 + 3 + 2
    assert model.training and torch.equal(bn.running_mean, stats) and int(bn.num_batches_tracked) == 0
    assert torch.equal(torch.get_rng_state(), rng)


def test_client_bytes_counts_state_copies_and_batch_activations() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))
    state = (16 * 8 + 8 + 8 * 2 + 2) * 4
    acts = 16 + 8 + 8 + 2  # per sample
    want = memory.STATE_COPIES * state + memory.ACTIVATION_COPIES * acts * 10 * 4
    assert memory.client_bytes(model, (1, 4, 4), 10) == want


@pytest.mark.parametrize("limit,usage,want", [("max", "100", None), ("9223372036854771712", "5", None),
                                              ("1000", "300", 700)])
def test_cgroup_headroom_reads_the_container_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   limit: str, usage: str, want: int | None) -> None:
    (tmp_path / "max").write_text(limit + "\n")
    (tmp_path / "cur").write_text(usage + "\n")
    monkeypatch.setattr(memory, "_CGROUP_FILES", [(str(tmp_path / "nope"), str(tmp_path / "nope2")),
                                                  (str(tmp_path / "max"), str(tmp_path / "cur"))])
    assert memory._cgroup_headroom() == want


def test_cpu_available_bytes_is_capped_by_the_container(monkeypatch: pytest.MonkeyPatch) -> None:
    free = memory.available_bytes("cpu")
    assert free is not None and free > 0
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: 12345)
    assert memory.available_bytes("cpu") == 12345


def test_groups_are_sized_to_free_memory_and_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU a group that does not fit is not an exception but the OOM killer: size it first."""
    store = make_store()
    spec = ModelSpec.make("lenet5", 4, SHAPE)
    tasks = make_tasks(store, spec, LocalTrain(1, 16, adam(), 1e-3))
    vb = VectorizedBackend(store)
    each = memory.client_bytes(vb.buffers.get(spec), SHAPE, 16)
    monkeypatch.setattr("fedslim.engine.vectorized.available_bytes", lambda _d: int(2.5 * each / MEMORY_SHARE))
    sizes = record_group_sizes(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vec = vb.run(tasks)
        vb.run(tasks)
    assert sizes == [2, 2, 1] * 2
    said = [str(w.message) for w in caught if "GiB free" in str(w.message)]
    assert len(said) == 1 and "a group of 5 lenet5 clients" in said[0] and "at most 2 at once" in said[0]
    assert_close(SerialBackend(store).run(tasks), vec, 1e-5)
    # A smaller engine.max_group still wins; plenty of memory leaves the group whole.
    monkeypatch.setattr("fedslim.engine.vectorized.available_bytes", lambda _d: 1 << 50)
    sizes.clear()
    VectorizedBackend(store, max_group=3).run(tasks)
    VectorizedBackend(store).run(tasks)
    assert sizes == [3, 2, 5]
