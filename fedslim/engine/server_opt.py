"""Server optimizers on the aggregated update (FedAvg, FedAvgM / server momentum, FedAdam)."""

from __future__ import annotations

from typing import Any

import torch

from fedslim.config import ServerOptimizerConfig
from fedslim.engine.task import State


class ServerOptimizer:
    """Applies the averaged client delta to the global state.

    With ``name: none`` the new model is ``w + mean(delta)`` (plain FedAvg). Otherwise the pseudo-gradient
    ``-mean(delta)`` drives SGD with momentum (Hsu et al. 2019) or Adam (Reddi et al. 2021) on the
    parameters; buffers such as BatchNorm statistics are always averaged plainly.
    """

    def __init__(self, cfg: ServerOptimizerConfig):
        self.cfg = cfg
        self.m: State = {}
        self.v: State = {}
        self.t = 0

    def step(self, state: State, delta: State, param_keys: set[str]) -> State:
        c = self.cfg
        out = dict(state)
        self.t += 1
        for k, d in delta.items():
            if not state[k].is_floating_point():
                out[k] = state[k] + d.to(state[k].dtype)
                continue
            if c.name == "none" or k not in param_keys:
                out[k] = state[k] + d
                continue
            g = -d
            if c.name == "sgd":
                if c.momentum > 0:
                    self.m[k] = c.momentum * self.m[k] + g if k in self.m else g.clone()
                    g = self.m[k]
                out[k] = state[k] - c.lr * g
            else:  # adam
                b1, b2 = c.betas
                self.m[k] = b1 * self.m.get(k, torch.zeros_like(g)) + (1 - b1) * g
                self.v[k] = b2 * self.v.get(k, torch.zeros_like(g)) + (1 - b2) * g * g
                out[k] = state[k] - c.lr * self.m[k] / (self.v[k].sqrt() + c.eps)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.m, self.v, self.t = dict(s["m"]), dict(s["v"]), int(s["t"])
