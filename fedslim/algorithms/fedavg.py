"""FedAvg — McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data", AISTATS 2017.

The global model is replaced by the sample-weighted mean of the client models; expressed here as
``w + mean(delta)`` so that a server optimizer (FedAvgM, FedAdam) can act on the same mean update.
"""

from __future__ import annotations

from typing import Any

from fedslim.algorithms.aggregate import mean_delta
from fedslim.algorithms.base import BUDGET_ALGORITHMS, Algorithm, budget_shortfall, check_tiers, refuse_budget
from fedslim.config import RunConfig
from fedslim.engine.server_opt import ServerOptimizer
from fedslim.engine.task import ClientResult, ClientTask, ModelSpec, State
from fedslim.registry import ALGORITHMS


@ALGORITHMS.register("fedavg", "FedAvg (McMahan et al. 2017), optional server optimizer")
class FedAvg(Algorithm):
    name = "fedavg"

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        check_tiers(cfg, cls.name, reads_width=False, reads_capable=False)

    def setup(self) -> None:
        self.spec: ModelSpec = self.ctx.spec()
        self.state: State = self.ctx.init_state(self.spec)
        self.server_opt = ServerOptimizer(self.ctx.cfg.federation.server_optimizer)
        self.param_keys = set(dict(self.spec.build().named_parameters()))
        self.check_budgets()

    def check_budgets(self) -> None:
        """Every device trains the one global model: a tier whose model_bytes or memory_mb cannot hold
        it could not take part, so the run is refused (here: the model's size needs the dataset's shape)."""
        for i, t in enumerate(self.ctx.devices.tiers):
            why = budget_shortfall(i, t, f"the {self.spec.name} model {self.name} sends every device", self.spec,
                                   self.state)
            if why:
                refuse_budget(why, f"raise the budget, make every device's model smaller (model.width), or use "
                                   f"an algorithm that honours budgets: {BUDGET_ALGORITHMS}")

    def plan(self, round_: int, cohort: list[int]) -> list[ClientTask]:
        return [self.ctx.train_task(round_, c, self.spec, self.state) for c in cohort]

    def aggregate(self, round_: int, tasks: list[ClientTask], results: list[ClientResult]) -> dict[str, Any]:
        delta = mean_delta(results, self.ctx.cfg.federation.weighted)
        if delta:
            self.state = self.server_opt.step(self.state, delta, self.param_keys)
        return {}

    def eval_targets(self, round_: int) -> dict[str, tuple[ModelSpec, State]]:
        return {"global": (self.spec, self.state)}

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "server_opt": self.server_opt.state_dict()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.state = dict(s["state"])
        self.server_opt.load_state_dict(s["server_opt"])
