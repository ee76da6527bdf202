"""Federated Dropout — Caldas, Konečný, McMahan & Talwalkar, "Expanding the Reach of Federated
Learning by Reducing Client Resource Requirements", arXiv:1812.07210 (2018), in the
model-heterogeneous form used as a baseline by HeteroFL and FedRolex.

HeteroFL with random sub-models: a client of rate ``r`` keeps a uniformly random ``ceil(r * n)`` of
the ``n`` channels of every channel group, drawn afresh for every (round, client) from the run's
``submodel`` random stream; coupled dimensions (a layer's outputs, its norm, the next layer's
inputs, residual branches) share the draw. Aggregation, static BN, Scaler, masked loss and
per-level evaluation are HeteroFL's.

Departures from the reference: Caldas et al. drop a fixed fraction of activations of fully
connected layers (and filters of convolutions) for every client alike and aggregate with FedAvg;
as in the FedRolex benchmark, here the fraction follows each client's rate and aggregation is
HeteroFL's sum-and-count, so the three methods differ only in which channels a client holds. Levels
are evaluated as prefix sub-models of the global model, as HeteroFL does.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedslim.algorithms.heterofl import HeteroFL
from fedslim.algorithms.submodel import IndexPlan
from fedslim.registry import ALGORITHMS
from fedslim.rng import torch_gen


@ALGORITHMS.register("fed_dropout", "Federated Dropout (Caldas et al. 2018): random channels per client and round")
class FederatedDropout(HeteroFL):
    name = "fed_dropout"
    shared_plan: ClassVar[bool] = False

    def check_channel_groups(self) -> None:
        self.index_plan(1, 0, self.labels[-1])

    def index_plan(self, round_: int, client: int, label: str) -> IndexPlan:
        gen = torch_gen(self.ctx.seed, "submodel", round_, client)
        return self.layout.plan(self.sub_shapes[label],
                                lambda _g, n, k: torch.randperm(n, generator=gen)[:k].sort().values)
