"""Dispatch order (fedslim.engine.schedule): the costliest client tasks go to the workers first."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from fedslim.config import OptimizerConfig, validate
from fedslim.data.types import DatasetBundle, TensorData
from fedslim.engine.schedule import STEP_OVERHEAD_MACS, dispatch_order, task_cost
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientTask, LocalTrain, ModelSpec

TRAIN = LocalTrain(epochs=2, batch_size=10, optimizer=OptimizerConfig(name="adam", lr=1e-3), lr=1e-3)


def _task(client: int = 0, spec: ModelSpec | None = None, train: LocalTrain | None = TRAIN,
          **extras: Any) -> ClientTask:
    return ClientTask(client=client, round=1, spec=spec or ModelSpec.make("lenet5", 10, (1, 28, 28)), state={},
                      train=train, kind="train" if train else "evaluate", extras=extras)


def test_cost_counts_steps_and_forward_backward_macs() -> None:
    # 25 samples, 2 epochs, batch 10: 3 steps per epoch, 50 samples trained on.
    assert task_cost(_task(), 25, 1000.0) == 6 * STEP_OVERHEAD_MACS + 3 * 50 * 1000.0
    # Forward only, batch 1000: one step, each sample once.
    assert task_cost(_task(train=None), 25, 1000.0) == STEP_OVERHEAD_MACS + 25 * 1000.0
    assert task_cost(_task(train=None, batch_size=10), 25, 1000.0) == 3 * STEP_OVERHEAD_MACS + 25 * 1000.0


def test_max_steps_caps_the_cost() -> None:
    capped = dataclasses.replace(TRAIN, max_steps=4)
    assert task_cost(_task(train=capped), 25, 1000.0) == 4 * STEP_OVERHEAD_MACS + 3 * 40 * 1000.0
    assert task_cost(_task(train=capped), 1000, 1000.0) == task_cost(_task(train=capped), 40, 1000.0)
    assert task_cost(_task(train=capped), 25, 1000.0) < task_cost(_task(), 25, 1000.0)


def _store(sizes: list[int], test_sizes: list[int] | None = None) -> ClientStore:
    n = sum(sizes)
    x, y = torch.zeros(n, 1, 28, 28), torch.zeros(n, dtype=torch.long)
    test = list(torch.arange(sum(test_sizes)).split(test_sizes)) if test_sizes else None
    return ClientStore(DatasetBundle("zeros", TensorData(x, y), TensorData(x[:2], y[:2]), 10, (1, 28, 28)),
                       list(torch.arange(n).split(sizes)), test)


def test_bigger_clients_and_wider_models_go_first_ties_in_cohort_order() -> None:
    store = _store([30, 90, 30, 60, 30])
    tasks = [_task(c) for c in range(5)]
    assert dispatch_order(tasks, store) == [1, 3, 0, 2, 4]
    assert dispatch_order(tasks, store, "in_order") == [0, 1, 2, 3, 4]
    # Equal data, HeteroFL-style widths listed narrowest first: the full-width model leads.
    narrow = [_task(c, ModelSpec.make("heterofl_cnn", 10, (1, 28, 28), width=w)) for c, w in
              enumerate([0.0625, 0.25, 1.0, 0.5, 0.125])]
    assert dispatch_order(narrow, _store([40] * 5)) == [2, 3, 1, 4, 0]


def test_evaluation_tasks_are_ranked_by_their_local_test_split() -> None:
    store = _store([50, 50, 50], test_sizes=[5, 500, 50])
    tasks = [_task(c, train=None, split="test", batch_size=10) for c in range(3)]
    assert dispatch_order(tasks, store) == [1, 2, 0]


def test_a_model_without_a_mac_count_is_ranked_by_steps() -> None:
    unknown = ModelSpec.make("not_a_model", 10, (1, 28, 28))
    tasks = [_task(c, unknown) for c in range(3)]
    assert dispatch_order(tasks, _store([10, 40, 20])) == [1, 2, 0]


def test_an_unknown_order_names_the_setting_and_its_values() -> None:
    with pytest.raises(ValueError, match=r"engine.dispatch.*'fastest'.*longest_first, in_order"):
        dispatch_order([_task()], _store([10]), "fastest")
    with pytest.raises(ValueError, match=r"engine.dispatch"):
        validate({"engine": {"dispatch": "fastest"}})
