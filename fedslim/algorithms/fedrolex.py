"""FedRolex — Alam, Liu, Yan & Zhang, "FedRolex: Model-Heterogeneous Federated Learning with Rolling
Sub-Model Extraction", NeurIPS 2022 (reference code: github.com/AIoT-MLSys-Lab/FedRolex).

HeteroFL with one change: a client of rate ``r`` holds, in every layer of ``n`` channels, the
window of ``k = ceil(r * n)`` channels starting at ``(round - 1) mod n`` and wrapping around, so
over ``n`` rounds every global channel is trained by every level. Windows are per channel group
(the dimensions a residual add or a following layer couples), so they stay consistent across the
network. Aggregation, static BN, Scaler, masked loss and per-level evaluation are HeteroFL's.

Departures from the reference code: the window advances forward, ``(start + arange(k)) % n`` as in
the paper's definition, where the reference rolls ``arange(n)`` the other way (``torch.roll``), which
is the same scheme mirrored. Levels are evaluated as prefix sub-models of the global model (as
HeteroFL does), so every method here is measured the same way.
"""

from __future__ import annotations

import torch

from fedslim.algorithms.heterofl import HeteroFL
from fedslim.algorithms.submodel import IndexPlan
from fedslim.registry import ALGORITHMS


def rolling_window(start: int, n: int, k: int) -> torch.Tensor:
    return (start + torch.arange(k)) % n


@ALGORITHMS.register("fedrolex", "FedRolex (Alam et al. 2022): HeteroFL with a rolling channel window")
class FedRolex(HeteroFL):
    name = "fedrolex"

    def check_channel_groups(self) -> None:
        self.index_plan(1, 0, self.labels[-1])

    def index_plan(self, round_: int, client: int, label: str) -> IndexPlan:
        return self.layout.plan(self.sub_shapes[label], lambda _g, n, k: rolling_window((round_ - 1) % n, n, k))
