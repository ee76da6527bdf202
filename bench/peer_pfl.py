"""The workload on Apple's pfl (``pfl`` package): its PyTorch simulation (``SimulatedBackend``,
``FederatedAveraging``, ``PyTorchModel``), set up as pfl's own examples do.

The same model, initial weights, split, optimizer (``local_optimizer_create=torch.optim.Adam``) and
cohorts (a user sampler that yields fedslim's cohorts in order); the central optimizer is SGD with
learning rate 1, which makes the update the plain mean of the client models. pfl's local loop walks
each user's data in order rather than shuffling it every epoch, so its accuracy differs a little
from the others'. HeteroFL is not in pfl; it is not run here (see bench/README.md).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from workloads import Workload, accuracy, setup


class PflNet(nn.Module):
    """fedslim's model with the ``loss`` and ``metrics`` methods pfl's PyTorchModel requires."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        self.train(not eval)
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict[str, Any]:  # noqa: A002
        from pfl.metrics import Weighted

        self.train(not eval)
        out = self(x)
        return {"loss": Weighted(float(F.cross_entropy(out, y, reduction="sum")), len(y))}


def run_pfl(w: Workload, data_dir: str, t0: float) -> dict[str, Any]:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    from fedslim.models import build_model

    if w.algorithm != "fedavg":
        raise SystemExit(f"pfl: no {w.algorithm} here")
    s = setup(w, data_dir)
    x, y = s.bundle.train.x, s.bundle.train.y
    order = iter([c for cohort in s.cohorts for c in cohort])
    fed = FederatedDataset(lambda uid: Dataset(raw_data=[x[s.parts[uid]], y[s.parts[uid]]], user_id=uid),
                           user_sampler=lambda: next(order))
    inner = build_model(w.model, num_classes=s.bundle.num_classes, input_shape=s.bundle.input_shape)
    inner.load_state_dict(s.init_state)
    net = PflNet(inner)
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.Adam,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    # A round runs from the end of the previous one's callback (or the start) to its own callback.
    marks: dict[str, Any] = {"begin": None, "since": None, "round_s": [], "acc": {}}

    class Timer(TrainingProcessCallback):
        def on_train_begin(self, *, model: Any) -> Metrics:
            marks["begin"] = marks["since"] = time.perf_counter()
            return Metrics()

        def after_central_iteration(self, aggregate_metrics: Metrics, model: Any, *,
                                    central_iteration: int) -> tuple[bool, Metrics]:
            marks["round_s"].append(time.perf_counter() - marks["since"])
            if central_iteration == 0:
                marks["acc"][1] = accuracy(net, s.bundle.test.x, s.bundle.test.y)
            marks["since"] = time.perf_counter()
            return False, Metrics()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=w.rounds, evaluation_frequency=10**6,
                                           train_cohort_size=w.per_round, val_cohort_size=0),
        backend=SimulatedBackend(training_data=fed, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(local_num_epochs=w.epochs, local_learning_rate=w.lr,
                                              local_batch_size=w.batch_size),
        model_eval_params=NNEvalHyperParams(local_batch_size=1000),
        callbacks=[Timer()])
    return {"updates": w.per_round * len(marks["round_s"]), "round_s": marks["round_s"],
            "startup_s": marks["begin"] - t0,
            "acc_round1": marks["acc"].get(1)}
