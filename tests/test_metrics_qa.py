"""Metrics from logits: top-k against top-1, broken outputs, macro averages on local splits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score, top_k_accuracy_score

from fedslim.metrics import metrics_from_logits
from fedslim.report import report


def test_constant_logits_top5_not_below_top1() -> None:
    # A model whose outputs do not depend on the input (dead ReLUs, all-zero weights) ties every class.
    # argmax picked class 0 while topk picked other tied classes: top-1 25 %, top-5 0 %.
    y = torch.tensor([0, 1, 2, 3])
    m = metrics_from_logits(torch.zeros(4, 10), y, 10)
    assert m["acc"] == 0.25  # ties go to the lowest class index, as argmax does
    assert m["top5"] == 1.0  # classes 0..4 are the top 5
    assert m["top5"] >= m["acc"]


def test_topk_at_least_top1_on_random_ties() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (500, 10), generator=g).float()  # many ties
    y = torch.randint(0, 10, (500,), generator=g)
    m = metrics_from_logits(logits, y, 10)
    assert m["top5"] >= m["acc"]
    assert m["acc"] == float((logits.argmax(1) == y).double().mean())


def test_nan_logits_count_as_misses_with_nan_loss() -> None:
    # Before: loss 2.3026 (as if uniform), acc 0.25 (NaN read as the max at class 0) and top-5 0.0.
    y = torch.tensor([0, 1, 2, 3])
    m = metrics_from_logits(torch.full((4, 10), float("nan")), y, 10)
    assert math.isnan(m["loss"])
    assert m["acc"] == 0.0 and m["top5"] == 0.0
    assert m["f1_macro"] == 0.0 and m["recall"] == 0.0


def test_one_nan_row_is_a_miss_and_the_rest_are_scored() -> None:
    logits = torch.eye(4, 10) * 5
    logits[3, 2] = float("nan")
    m = metrics_from_logits(logits, torch.tensor([0, 1, 2, 3]), 10)
    assert m["acc"] == 0.75 and m["top5"] == 0.75
    assert math.isnan(m["loss"])


def test_plus_inf_logit_is_not_turned_into_a_huge_loss() -> None:
    # Before: +inf was replaced by -1e9, so a right answer with an infinite logit gave loss 2.5e8.
    logits = torch.zeros(4, 10)
    logits[0, 0] = float("inf")
    m = metrics_from_logits(logits, torch.tensor([0, 1, 2, 3]), 10)
    assert not m["loss"] > 1e6


def test_masked_classes_still_give_a_finite_loss() -> None:
    logits = torch.full((3, 10), float("-inf"))
    logits[:, 4] = 2.0
    logits[:, 7] = 1.0
    m = metrics_from_logits(logits, torch.tensor([4, 4, 7]), 10)
    assert math.isfinite(m["loss"]) and m["acc"] == 2 / 3 and m["top5"] == 1.0


def test_accuracy_is_the_exact_fraction() -> None:
    # Before: float32 mean, e.g. 105/360 stored as 0.2916666567325592.
    y = torch.arange(360) % 10
    logits = torch.zeros(360, 10)
    logits[torch.arange(105), y[:105]] = 1.0
    logits[torch.arange(105, 360), (y[105:] + 1) % 10] = 1.0
    m = metrics_from_logits(logits, y, 10)
    assert m["acc"] == 105 / 360


def test_matches_sklearn_on_random_logits() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, 10, generator=g)
    y = torch.randint(0, 10, (300,), generator=g)
    m = metrics_from_logits(logits, y, 10)
    yt, yp = y.numpy(), logits.argmax(1).numpy()
    assert m["top5"] == top_k_accuracy_score(yt, logits.numpy(), k=5, labels=np.arange(10))
    assert m["f1_macro"] == f1_score(yt, yp, average="macro")
    assert m["f1_weighted"] == f1_score(yt, yp, average="weighted")
    assert m["precision"] == precision_score(yt, yp, average="macro", zero_division=0)
    assert m["recall"] == recall_score(yt, yp, average="macro", zero_division=0)
    assert abs(m["loss"] - float(torch.nn.functional.cross_entropy(logits, y))) < 1e-6


def test_macro_averages_skip_classes_absent_from_the_split() -> None:
    # A client's local test split with 2 of 10 classes, every prediction right (the label mask restricts
    # predictions to its classes). Before: f1_macro / precision / recall 0.2, averaging in 8 classes with
    # neither a sample nor a prediction as 0.
    logits = torch.full((6, 10), float("-inf"))
    logits[:, 3] = torch.tensor([5.0, 5.0, 5.0, 0.0, 0.0, 0.0])
    logits[:, 8] = torch.tensor([0.0, 0.0, 0.0, 5.0, 5.0, 5.0])
    y = torch.tensor([3, 3, 3, 8, 8, 8])
    m = metrics_from_logits(logits, y, 10)
    assert m["acc"] == 1.0
    assert m["f1_macro"] == 1.0 and m["precision"] == 1.0 and m["recall"] == 1.0 and m["f1_weighted"] == 1.0


def test_macro_averages_count_a_predicted_class_with_no_samples() -> None:
    # Class 5 is predicted but has no test sample: its precision is 0 and it stays in the macro average.
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), torch.tensor([1, 1, 2, 5])] = 1.0
    y = torch.tensor([1, 1, 2, 2])
    m = metrics_from_logits(logits, y, 10)
    yp = np.array([1, 1, 2, 5])
    assert m["precision"] == precision_score(y.numpy(), yp, average="macro", zero_division=0)  # over {1, 2, 5}
    assert m["precision"] == (1 + 1 + 0) / 3
    assert m["recall"] == (1 + 0.5 + 0) / 3


def _fake_run(folder: Path, local: dict) -> Path:
    folder.mkdir(parents=True)
    row = {"round": 1, "eval": {"global": {"acc": 0.5, "f1_weighted": 0.4, "n": 10}}, "local": local,
           "cum_bytes_up": 1000, "cum_bytes_down": 1000, "sim_time_s": 0.1}
    (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "summary.json").write_text(json.dumps({"name": folder.name, "algorithm": "fedavg", "model": "lenet5"}))
    return folder


def test_report_shows_a_local_entry_without_samples_instead_of_crashing(tmp_path: Path) -> None:
    # Every client's local test split empty (one-sample clients) gives local {"all": {"n": 0}}. Before:
    # `fedslim report` died with KeyError: 'acc'.
    run = _fake_run(tmp_path / "r1", {"all": {"n": 0}})
    text = report([str(run)], str(tmp_path / "out"))
    line = next(ln for ln in text.splitlines() if ln.startswith("r1 local/all"))
    assert line.split()[-6:] == ["1", "-", "(no", "local", "test", "samples)"]


def test_report_local_rows_show_their_accuracy(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "r2", {"all": {"n": 20, "acc": 0.25}, "fast": {"n": 5, "acc": 0.4}})
    text = report([str(run)], str(tmp_path / "out"))
    rows = {ln.split()[1]: ln.split()[-1] for ln in text.splitlines() if ln.startswith("r2 local/")}
    assert rows == {"local/all": "25.00", "local/fast": "40.00"}


def test_batch_statistic_bn_evaluates_a_trailing_one_sample_batch_with_the_previous_one() -> None:
    from fedslim.data.types import TensorData
    from fedslim.metrics import predict
    from fedslim.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, input_shape=(1, 8, 8), norm="bn", track_running_stats=False)
    data = TensorData(torch.randn(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))
    out = predict(model, data, batch_size=4)  # batches 4 + 1: the 1 is folded in, so one batch of 5
    assert out.shape == (5, 10)
    assert torch.allclose(out, predict(model, data, batch_size=5))
    assert predict(model, TensorData(data.x[:0], data.y[:0])).numel() == 0  # an empty local split
    lone = TensorData(data.x[:1], data.y[:1])
    with pytest.raises(ValueError, match=r"cannot evaluate MLP on a batch of one sample \(of a set of 1\)") as e:
        predict(model, lone)
    assert "model.options.track_running_stats=false" in str(e.value)


def test_report_tells_runs_with_one_folder_name_apart(tmp_path: Path) -> None:
    from fedslim.report import run_labels

    # `fedslim run` names every run folder 'run' unless told otherwise: three such runs were three rows
    # called 'run', in the table and in the plots' legends.
    a = _fake_run(tmp_path / "a" / "run", {"all": {"n": 4, "acc": 0.5}})
    b = _fake_run(tmp_path / "b" / "run", {})
    c = _fake_run(tmp_path / "x" / "b" / "run", {})
    solo = _fake_run(tmp_path / "solo", {})
    # b and x/b share 'b/run', so b takes one more part of its path
    assert run_labels([a, b, c, solo]) == ["a/run", f"{tmp_path.name}/b/run", "x/b/run", "solo"]
    text = report([str(a), str(b), str(solo)], str(tmp_path / "out"))
    first = [ln.split()[0] for ln in text.splitlines()[2:6]]
    assert first == ["a/run", "a/run", "b/run", "solo"]  # a/run's second row is its local/all
    assert "a/run local/all" in text
