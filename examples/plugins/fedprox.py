"""FedProx — Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020: an example
fedslim plugin (see docs/plugins.md).

Each client minimises its loss plus ``mu / 2 * ||w - w_global||^2``, which keeps local models near
the global one when the clients' data differ. The server averages as FedAvg does. ``mu: 0`` is FedAvg
exactly. (The paper also lets stragglers do partial work; here every client trains its full epochs.)

Use it from a config:

    plugins: [plugins/fedprox.py]        # relative to the config file's folder
    algorithm: {name: fedprox, params: {mu: 0.01}}
"""

from __future__ import annotations

import warnings

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedslim.algorithms.fedavg import FedAvg
from fedslim.data.types import TensorData
from fedslim.engine.client import train_delta
from fedslim.engine.task import ClientResult, ClientTask
from fedslim.registry import ALGORITHMS, CLIENT_PROCEDURES


class FedProxParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mu: float = Field(0.01, ge=0, description="weight of the proximal term mu/2 * ||w - w_global||^2")


@CLIENT_PROCEDURES.register("fedprox_train", "local training with FedProx's proximal term; returns the delta")
def fedprox_train(task: ClientTask, data: TensorData, model: nn.Module) -> ClientResult:
    mu = float(task.extras["mu"])
    dev = next(model.parameters()).device
    # The buffer's parameters stay the same tensors when the start weights are loaded into them.
    params = [(p, task.state[k].to(dev)) for k, p in model.named_parameters() if p.requires_grad]

    def proximal() -> torch.Tensor:
        return 0.5 * mu * sum(((p - p0) ** 2).sum() for p, p0 in params)  # type: ignore[return-value]

    with warnings.catch_warnings():
        # A narrow convolution's weight is a view of a padded tensor the engine trains (fedslim.engine.flat);
        # torch adds the proximal term's gradient to that view correctly, but warns that it is not dense.
        warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
        return train_delta(task, data, model, penalty=proximal if mu > 0 else None)


@ALGORITHMS.register("fedprox", "FedProx (Li et al. 2020): FedAvg with a proximal term in local training "
                                "(example plugin)")
class FedProx(FedAvg):
    name = "fedprox"
    Params = FedProxParams
    params: FedProxParams

    def plan(self, round_: int, cohort: list[int]) -> list[ClientTask]:
        return [self.ctx.train_task(round_, c, self.spec, self.state, kind="fedprox_train",
                                    extras={"mu": self.params.mu}) for c in cohort]
