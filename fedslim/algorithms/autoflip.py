"""AutoFLIP — Internò, Raponi, van Stein, Bäck, Olhofer, Jin & Hammer, "Adaptive Hybrid Model Pruning in
Federated Learning through Loss Exploration" (arXiv 2405.10271; reference code
github.com/ChristianInterno/AutoFLIP).

Round 1 is the federated loss exploration. A share of the clients, the explorers (``explorers``, by
default ``federation.participation``), each train their own copy of the initial global model for
``explore_epochs`` and upload the update. From those uploads the server scores every prunable weight
by its *learning spread*: the mean over explorers of the squared drift from the base model,
normalised within each tensor (``normalize``: min-max as in the reference, ``robust`` = (x - median)
/ IQR, or ``none``). The ``amount`` of the prunable weights with the lowest scores, ranked over all
prunable tensors together, are pruned. From round 2 FedAvg trains the pruned model: each client
re-applies the mask after every local step, the server after every aggregation, and models and
updates travel sparse.

Where this departs from the reference code, and why:

* The explorers train independent copies from the same base weights: each exploration is a client
  task like any other, a function of the base weights, the client's data and its seed. The
  reference's scouts trained one shared model object in turn, each continuing where the last
  stopped, and kept references to its ``state_dict`` rather than copies, so every scout's entry
  held the final weights of the last one.
* The mask stays applied while the model trains. The reference's clients re-apply it after a step
  only when ``checkpoints/mask<name>.pt`` exists, a file its exploration server deletes once it has
  pruned the global model (after saving the mask under another path), so the mask may never be
  re-applied and pruned weights can grow back.
* Pruning saves bytes. Pruned weights are exact zeros in the global model and in every update, and
  the wire encoding (:mod:`fedslim.codecs.wire`) sends only the nonzero values and their positions
  (a bitmap or varint gaps); without a configured ``codec.down`` / ``codec.up`` this algorithm uses
  that float32 encoding instead of the dense one. The reference uploaded dense parameters.
* Exactly ``round(amount * n)`` of the ``n`` prunable weights are pruned: the lowest scores, ties
  broken by position. The reference kept the scores strictly above a quantile; min-max puts each
  tensor's minimum at exactly 0, so it pruned at least one weight per tensor even at amount 0.
* Only the tensors named by ``codec.targets`` are pruned (by default the weights of convolutions and
  linear layers); the reference's mask also covered biases and normalisation scales.
* The exploration is a round of the run: its downloads, uploads and simulated time are counted like
  any other round's, and its metrics row says ``phase: explore``. Explorers come from the seeded
  sampling stream (the reference drew them with Python's unseeded ``random``).
* ``start_from: base`` (default, as the reference) prunes the base model and discards the
  explorers' training; ``explored`` prunes their FedAvg instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedslim.algorithms.fedavg import FedAvg
from fedslim.codecs import Codec, Pipeline, build_pipeline
from fedslim.config import RunConfig
from fedslim.engine.task import ClientResult, ClientTask, State
from fedslim.registry import ALGORITHMS
from fedslim.rng import torch_gen

EXPLORE_ROUND = 1


class AutoFLIPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: float = Field(0.5, ge=0, lt=1, description="share of the prunable weights (codec.targets) to prune, "
                                                       "ranked by learning spread over all of them")
    explorers: float | None = Field(None, gt=0, le=1, description=(
        "share of the clients that explore in round 1 (default: federation.participation)"))
    explore_epochs: int | None = Field(None, ge=1, description="local epochs of each explorer (default: "
                                                               "train.epochs)")
    normalize: Literal["minmax", "robust", "none"] = Field(
        "minmax", description="per-tensor scaling of the learning spread before the global ranking: minmax "
                              "(reference), robust ((x - median) / IQR) or none")
    guidance: Literal["spread", "random"] = Field(
        "spread", description="what ranks the weights: spread (the method) or random (seeded scores: the "
                              "ablation with the same exploration round, bytes and amount)")
    start_from: Literal["base", "explored"] = Field(
        "base", description="the model that is pruned after exploring: base (the initial model, as the "
                            "reference) or explored (the FedAvg of the explorers' models)")


def learning_spread(deltas: list[State], names: list[str]) -> State:
    """Mean over explorers of each weight's squared drift from the base model (float64)."""
    out: State = {}
    for k in names:
        acc = torch.zeros(deltas[0][k].shape, dtype=torch.float64)
        for d in deltas:
            acc += d[k].to(torch.float64) ** 2
        out[k] = acc / len(deltas)
    return out


def normalized(spread: State, how: str) -> State:
    """Each tensor's spread on a common scale, so that one threshold can rank all tensors together."""
    out: State = {}
    for k, s in spread.items():
        if how == "minmax":
            lo, hi = s.min(), s.max()
            out[k] = (s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)
        elif how == "robust":
            # numpy's: torch.quantile refuses tensors of more than 2**24 elements (AlexNet's fc.1 on CIFAR).
            q1, med, q3 = np.quantile(s.reshape(-1).numpy(), [0.25, 0.5, 0.75]).tolist()
            # Half a tensor or more with one spread (often zero) leaves no IQR; its range then sets the
            # scale, so that the tensor still ranks on the others' scale and not in raw units.
            scale = q3 - q1 if q3 > q1 else float(s.max() - s.min())
            out[k] = (s - med) / scale if scale > 0 else torch.zeros_like(s)
        else:
            out[k] = s.clone()
    return out


def prune_mask(scores: State, amount: float) -> State:
    """0/1 float32 masks pruning the ``round(amount * n)`` lowest scores over every tensor together.
    Ties at the cut go by position: tensors in the order given, elements in memory order."""
    names = list(scores)
    flat = torch.cat([scores[k].reshape(-1) for k in names])
    keep = torch.ones(flat.numel(), dtype=torch.float32)
    n = int(round(amount * flat.numel()))
    if n:
        order = torch.sort(flat, stable=True).indices
        keep[order[:n]] = 0.0
    out: State = {}
    start = 0
    for k in names:
        size = scores[k].numel()
        out[k] = keep[start:start + size].reshape(scores[k].shape).clone()
        start += size
    return out


def sparse_float32() -> Codec:
    """Float32 values, exact, with zeros left out (bitmap or varint positions, whichever is smaller)."""
    codec = Pipeline([])
    codec.name = "float32, zeros left out"
    return codec


@ALGORITHMS.register("autoflip", "AutoFLIP: loss-exploration pruning mask (round 1), then FedAvg of the "
                                 "pruned model, sent sparse")
class AutoFLIP(FedAvg):
    name = "autoflip"
    Params = AutoFLIPParams
    params: AutoFLIPParams

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.federation.rounds < 2:
            raise ValueError(f"federation.rounds: autoflip explores in round 1 and trains the pruned model from "
                             f"round 2, so it needs at least 2 rounds (got {cfg.federation.rounds})")

    def setup(self) -> None:
        super().setup()
        from fedslim.engine.run import compressible_names  # the engine's rule, so the mask covers what codecs see

        model = self.spec.build()
        self.prunable = [k for k in dict(model.named_parameters()) if k in
                         compressible_names(model, self.ctx.cfg.codec.targets)]
        if not self.prunable:
            raise ValueError(f"codec.targets: {self.ctx.cfg.codec.targets!r} names no tensor of model "
                             f"{self.spec.name} for autoflip to prune; allowed: weights, weights_and_biases, "
                             f"all_float")
        self.mask: State | None = None
        self.mask_stats: dict[str, Any] = {}
        self.mask_note: str | None = None
        # Pruned zeros are left out on the wire only by the pipeline's encoding; the exact codec is dense.
        cfg = self.ctx.cfg
        self.down: Codec | None = None if cfg.codec.down else sparse_float32()

    def uplink_codec(self) -> Codec:
        """The sparse-aware float32 encoding when ``codec.up`` is empty, else ``codec.up`` as configured. Kept
        here so that the exploration's error-feedback residuals can be dropped once the mask is built."""
        up = self.ctx.cfg.codec.up
        self.up: Codec = build_pipeline([s.model_dump() for s in up], "codec.up") if up else sparse_float32()
        return self.up

    def participation(self, round_: int) -> float | None:
        """The explorers' share in the exploration round; the configured participation otherwise."""
        return self.params.explorers if round_ == EXPLORE_ROUND else None

    def plan(self, round_: int, cohort: list[int]) -> list[ClientTask]:
        tasks = []
        for c in cohort:
            t = self.ctx.train_task(round_, c, self.spec, self.state, param_masks=self.mask,
                                    down_codec=self.down)
            if self.mask is None and self.params.explore_epochs is not None and t.train is not None:
                t.train = dataclasses.replace(t.train, epochs=self.params.explore_epochs)
            tasks.append(t)
        return tasks

    def aggregate(self, round_: int, tasks: list[ClientTask], results: list[ClientResult]) -> dict[str, Any]:
        if self.mask is not None:
            super().aggregate(round_, tasks, results)
            self.state = self.masked(self.state)
            return {}
        # A client without data trains no step and returns an all-zero delta: it explored nothing.
        explored = [r for r in results if r.delta and r.num_steps > 0]
        if not explored:
            from fedslim.engine.run import RunError  # said as a run error, not a traceback

            raise RunError(f"autoflip: none of the {len(tasks)} explorers of round {round_} (clients "
                           f"{', '.join(str(t.client) for t in tasks)}) holds training data, so no pruning mask can "
                           f"be built; raise algorithm.params.explorers or give every client data "
                           f"(data.partition.min_size)")
        base = self.state
        if self.params.start_from == "explored":
            super().aggregate(round_, tasks, results)
        if self.params.guidance == "random":
            gen = torch_gen(self.ctx.seed, "autoflip_random", round_)
            scores = {k: torch.rand(self.state[k].shape, generator=gen, dtype=torch.float64) for k in self.prunable}
        else:
            scores = normalized(learning_spread([r.delta for r in explored], self.prunable), self.params.normalize)
        self.mask = prune_mask(scores, self.params.amount)
        self.state = self.masked(self.state if self.params.start_from == "explored" else base)
        # A fresh server optimizer: the exploration's momentum would push pruned weights' neighbours.
        self.server_opt = type(self.server_opt)(self.ctx.cfg.federation.server_optimizer)
        self.forget_exploration_residuals()
        self.mask_stats = self.describe_mask(len(explored))
        s = self.mask_stats
        nonzero, params = self.parameter_counts()
        self.mask_note = (f"autoflip: {s['explorers']} explorers, {s['explore_epochs']} local epoch(s) each, pruned "
                          f"{s['pruned']:,} of {s['prunable']:,} prunable weights ({100 * s['sparsity']:.2f} %); "
                          f"the model now has {nonzero:,} nonzero parameters of {params:,}")
        self.ctx.note(self.mask_note)
        return {"phase": "explore", "mask_sparsity": s["sparsity"]}

    def forget_exploration_residuals(self) -> None:
        """Error feedback (``topk``) keeps, per client, what the explorers' uploads left out. With ``start_from:
        base`` the explorers' training is discarded, so that residual goes too; with ``explored`` it is kept
        but masked. Else a later upload would spend its top-k slots on pruned weights the server zeroes."""
        assert self.mask is not None
        self.up.restrict_memory(self.mask, forget=self.params.start_from == "base")

    def masked(self, state: State) -> State:
        assert self.mask is not None
        return {k: v * self.mask[k].to(v.dtype) if k in self.mask else v for k, v in state.items()}

    def describe_mask(self, explorers: int) -> dict[str, Any]:
        assert self.mask is not None
        pruned = {k: int((m == 0).sum()) for k, m in self.mask.items()}
        prunable = sum(m.numel() for m in self.mask.values())
        return {
            "explorers": explorers,
            "explore_epochs": self.params.explore_epochs or self.ctx.cfg.train.epochs,
            "amount": self.params.amount, "guidance": self.params.guidance, "normalize": self.params.normalize,
            "start_from": self.params.start_from,
            "prunable": prunable, "pruned": sum(pruned.values()),
            "sparsity": sum(pruned.values()) / max(prunable, 1),
            "per_tensor_sparsity": {k: pruned[k] / max(self.mask[k].numel(), 1) for k in self.mask},
        }

    def parameter_counts(self) -> tuple[int, int]:
        """(nonzero, all) parameters of the global model as it stands."""
        params = [v for k, v in self.state.items() if k in self.param_keys]
        return sum(int((v != 0).sum()) for v in params), sum(v.numel() for v in params)

    def summary(self) -> dict[str, Any]:
        if not self.mask_stats:
            return {}
        nonzero, params = self.parameter_counts()
        return {"autoflip": {**self.mask_stats, "params": params, "nonzero_params": nonzero}}

    def describe_summary(self, s: dict[str, Any]) -> list[str]:
        """The line under the run's table: the table's params column counts the dense model."""
        a = s.get("autoflip")
        if not a:
            return []
        return [f"autoflip: the global model keeps {a['nonzero_params']:,} of its {a['params']:,} parameters nonzero "
                f"(round 1's mask prunes {a['pruned']:,} of the {a['prunable']:,} prunable weights, "
                f"{100 * a['sparsity']:.2f} %; the params column counts them all)"]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mask": self.mask, "mask_stats": dict(self.mask_stats),
                "mask_note": self.mask_note}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        super().load_state_dict(s)
        self.mask = s.get("mask")
        self.mask_stats = dict(s.get("mask_stats") or {})
        self.mask_note = s.get("mask_note")
        if self.mask_note:  # a resumed run's summary still says what round 1 pruned (notes are not checkpointed)
            self.ctx.note(self.mask_note)
