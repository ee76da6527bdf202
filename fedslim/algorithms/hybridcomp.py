"""HybridCompFL — Oez, Taebi, Ghanadbashi, Farooq, Malekjafarian, Van Laerhoven & Golpayegani,
"Resource-aware Models via Pruning and Quantization in Heterogeneous Federated Learning"
(reference code: github.com/zeyneddinoz/HybridCompFL).

Only capable devices train: FedAvg among the devices of tiers with ``capable: true``, the
participation rate applied among them. After the last round the server compresses the global
model without data into a *ladder* of rungs: the dense float32 model, int8 alone, and for every
pruning amount L1 unstructured pruning followed by zero-aware symmetric int8 (``prune_int8``) or
the reverse (``int8_prune``). Every rung is encoded with the real codec
(:func:`fedslim.codecs.compress_state`), written to ``ladder/rung_<name>.bin``, and measured:
encoded bytes, ratio against float32, measured sparsity, rounding zeros, and accuracy / weighted
F1 of the decoded model on the test set. Each constrained device (``capable: false``) receives the
most accurate rung that fits its tier's budget, the bytes of the download are counted, and it is
evaluated on its own local data; optionally it fine-tunes locally with the pruning mask kept
(``finetune_epochs``), or it joins the federation after ``join_round`` with its compressed model
(``constrained_join``).

Budgets (``budget``): ``model_bytes`` compares the rung's encoded size with the tier's
``model_bytes``; ``memory`` compares the rung's encoded size plus the float32 activation memory of
batch-1 inference (the largest input + output of any layer: activations freed once consumed) with
the tier's ``memory_mb`` (10^6 bytes). Fine-tuning memory is not part of either check.

Where this departs from the reference code, and why:

* Int8 is zero-aware for real: a weight becomes zero only if it rounds to 0 at the tensor's scale,
  and those rounding zeros are counted. The reference first zeroed every weight with
  ``|w| <= min_nonzero = 0.01``, so 10 % pruning already meant about 60 % zeros.
* Sparsity is measured on the decoded model (zeros the device receives, over the compressed
  tensors), beside the nominal amount; the reference reported the amount it asked for.
* Pruned zeros cost nothing on the wire: positions are a bitmap or varint gaps, values bit-packed.
  The reference stored int8 tensors densely, so every rung was the same ~3.4x smaller and pruning
  saved no bytes. A rung's size is its file's size.
* The compressed models are actually sent to the constrained devices and evaluated there, on each
  device's own data (its local test split when ``data.local_test_fraction > 0``, otherwise its
  training data, which the model never saw because constrained devices do not train); the
  reference evaluated the rungs on the central test set only.
* Every random choice comes from the run seed; the reference set no seeds.
* Participation is ``round(rate * capable)`` devices per round drawn from the seeded sampling
  stream (the reference: ``int(rate * capable)`` with Python's unseeded ``random``). The reference
  made the first 10 of 100 devices capable for MNIST/FMNIST whatever the configured share; here
  the share is the capable tiers' share.
* Pruning ranks magnitudes over all compressed tensors together by default (``scope: global``,
  ``torch.nn.utils.prune.global_unstructured``); the reference pruned every layer by the same amount
  (``scope: layer``). A uniform amount strips the small, sensitive first convolution as hard as the
  large fully connected layers: on the LeNet & MNIST example (dense weighted F1 97.22) 40 % pruning
  + int8 keeps 97.14 globally but 95.64 per layer, at the same bytes.
* ``int8_prune`` prunes the int8 values directly (their magnitudes are the dequantized ones up to
  one scale), with the same L1 amounts as ``prune_int8``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedslim.algorithms.base import activation_bytes, budget_shortfall, check_tiers, refuse_budget
from fedslim.algorithms.fedavg import FedAvg
from fedslim.codecs import Codec, build_pipeline, compress_state
from fedslim.config import RunConfig
from fedslim.devices import split_counts
from fedslim.engine.task import ClientResult, ClientTask, LocalTrain, State
from fedslim.registry import ALGORITHMS
from fedslim.results import atomic_write_bytes, atomic_write_text, to_json

ORDERS = ("prune_int8", "int8_prune", "prune")
DEFAULT_AMOUNTS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


class HybridCompParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amounts: list[float] = Field(default_factory=lambda: list(DEFAULT_AMOUNTS),
                                 description="pruning amounts of the ladder, each in (0, 1)")
    orders: list[Literal["prune_int8", "int8_prune", "prune"]] = Field(
        default_factory=lambda: ["prune_int8", "int8_prune"],
        description="per amount: prune then int8, int8 then prune, or pruning alone (float32 survivors)")
    int8_rung: bool = Field(True, description="also a rung with int8 and no pruning")
    scope: Literal["global", "layer"] = Field(
        "global", description="the amount over all compressed tensors together, or in every layer (reference)")
    metric: Literal["f1_weighted", "acc"] = Field("f1_weighted", description="'most accurate' by this test metric")
    min_metric: float = Field(0.0, ge=0, le=1, description="never serve a rung scoring below this (0: any)")
    budget: Literal["model_bytes", "memory"] = Field(
        "model_bytes", description="model_bytes: encoded size <= tier model_bytes; memory: encoded size + "
                                   "batch-1 activations <= tier memory_mb")
    finetune_epochs: int = Field(0, ge=0, description="local epochs each served constrained device trains "
                                                       "its rung, mask kept (0: none)")
    constrained_join: bool = Field(False, description="served constrained devices join training after join_round")
    join_round: int | None = Field(None, ge=1, description="round after which they join (default: half the rounds)")
    write_rungs: bool = Field(True, description="write every rung's payload to ladder/rung_<name>.bin")

    @field_validator("amounts")
    @classmethod
    def _amounts(cls, v: list[float]) -> list[float]:
        for a in v:
            if isinstance(a, bool) or not 0 < a < 1:
                raise ValueError(f"every amount must be a number in (0, 1), got {a!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"amounts must not repeat, got {v}")
        return sorted(v)

    @field_validator("orders")
    @classmethod
    def _orders(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"orders must not repeat, got {v}")
        return v


@dataclass(frozen=True)
class Rung:
    """One compression recipe of the ladder."""

    name: str
    order: str  # dense | int8 | prune_int8 | int8_prune | prune
    amount: float

    def stages(self, scope: str) -> list[dict[str, Any]]:
        prune = {"name": "prune", "amount": self.amount, "scope": scope}
        int8 = {"name": "int8"}
        return {"dense": [], "int8": [int8], "prune_int8": [prune, int8], "int8_prune": [int8, prune],
                "prune": [prune]}[self.order]


def ladder_rungs(p: HybridCompParams) -> list[Rung]:
    rungs = [Rung("dense", "dense", 0.0)]
    if p.int8_rung:
        rungs.append(Rung("int8", "int8", 0.0))
    for a in p.amounts:
        for order in p.orders:
            tag = f"prune{a:g}"
            name = {"prune_int8": f"{tag}_int8", "int8_prune": f"int8_{tag}", "prune": tag}[order]
            rungs.append(Rung(name, order, a))
    return rungs


@ALGORITHMS.register("hybridcomp", "HybridCompFL: FedAvg on capable devices, data-free prune+int8 ladder "
                                   "for constrained ones")
class HybridCompFL(FedAvg):
    name = "hybridcomp"
    Params = HybridCompParams
    params: HybridCompParams
    rounds_fixed = ("it deploys its compressed models after the last round, and join_round defaults to half "
                    "of federation.rounds")

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        p = HybridCompParams.model_validate(cfg.algorithm.params)
        tiers = cfg.devices.tiers
        # Capable devices train the model and constrained ones get compressed copies of it: none is narrower.
        check_tiers(cfg, cls.name, reads_width=False, reads_capable=True)
        if not any(t.capable for t in tiers):
            raise ValueError("devices.tiers: HybridCompFL trains on capable devices only; mark at least one tier "
                             "'capable: true'")
        if cfg.devices.assignment == "dynamic":
            raise ValueError("devices.assignment: HybridCompFL deploys a model per device, so a device's tier "
                             "must not change between rounds; use fixed or random")
        # Tiers get whole devices (largest remainder, as DevicePopulation does; fixed and random give the
        # same counts): a capable share too small for data.num_clients leaves nobody to train.
        counts = split_counts([t.share for t in tiers], cfg.data.num_clients)
        if not any(n for t, n in zip(tiers, counts, strict=True) if t.capable):
            capable = [i for i, t in enumerate(tiers) if t.capable]
            share = sum(tiers[i].share for i in capable) / sum(t.share for t in tiers)
            raise ValueError(f"devices.tiers.{capable[0]}.share: the capable tiers ("
                             f"{', '.join(repr(tiers[i].name) for i in capable)}) get 0 of the "
                             f"{cfg.data.num_clients} devices (data.num_clients) at a {share:.2%} share of the "
                             f"population, so no device would train; raise their share to at least "
                             f"1/{cfg.data.num_clients} of the total, or raise data.num_clients")
        field = "model_bytes" if p.budget == "model_bytes" else "memory_mb"
        for i, t in enumerate(tiers):
            if not t.capable and getattr(t, field) is None:
                raise ValueError(f"devices.tiers.{i}.{field}: constrained tier '{t.name}' needs a budget "
                                 f"(algorithm.params.budget is {p.budget})")
        if (p.finetune_epochs or p.constrained_join) and cfg.data.local_test_fraction <= 0:
            what = "finetune_epochs" if p.finetune_epochs else "constrained_join"
            raise ValueError(f"algorithm.params.{what}: constrained devices then train on their data, so they are "
                             f"evaluated on a held-out local split; set data.local_test_fraction > 0 (e.g. 0.2)")
        if p.constrained_join and p.join_round is None and cfg.federation.rounds < 2:
            # the default, half the rounds (at least 1), is the last round: nobody would join
            raise ValueError("algorithm.params.constrained_join: constrained devices join after join_round (default: "
                             "half the rounds) and train from the next round, so federation.rounds must be at "
                             f"least 2, got {cfg.federation.rounds}")
        if p.constrained_join and p.join_round is not None and p.join_round >= cfg.federation.rounds:
            raise ValueError(f"algorithm.params.join_round: must be below federation.rounds "
                             f"({cfg.federation.rounds}), got {p.join_round}")

    # ------------------------------------------------------------------ training
    def setup(self) -> None:
        super().setup()
        ctx = self.ctx
        self.assignment = ctx.devices.assignment(1)
        self.capable = [c for c in range(ctx.num_clients) if ctx.devices.tiers[int(self.assignment[c])].capable]
        self.compressible = self._compressible_names()
        self.join_rungs: dict[str, str] = {}  # constrained tier -> rung name, once they have joined
        self._codecs: dict[str, Codec] = {}
        self._join_cache: tuple[int, dict[str, tuple[State, State]]] | None = None
        self._decoded: dict[str, State] = {}
        if self.params.constrained_join:
            self.join_round = self.params.join_round or max(1, ctx.cfg.federation.rounds // 2)
        if len(self.capable) == ctx.num_clients:
            ctx.note("hybridcomp: every device is capable; the ladder is built but no device is constrained")
        if self.params.budget == "memory":
            # Known before training: no rung fits a memory budget below the activations alone. Said now,
            # not after the last round (the tier stays in the population, and is reported unserved).
            act = activation_bytes(self.spec)
            for t in self._constrained_tiers():
                if self.budget_of(t) < act:
                    ctx.note(f"hybridcomp: tier '{t.name}' can never be served: its memory_mb {t.memory_mb:g} "
                             f"({self.budget_of(t):,.0f} B) is below the batch-1 activation memory of "
                             f"{self.spec.name} alone ({act:,} B, before any model bytes); it will be "
                             f"reported unserved")

    def check_budgets(self) -> None:
        """Capable devices train the full model, as FedAvg's do: a budget set on a capable tier must hold it.
        A constrained tier's budget picks its rung (after training); the other budget field is not read."""
        other = "memory_mb" if self.params.budget == "model_bytes" else "model_bytes"
        for i, t in enumerate(self.ctx.devices.tiers):
            if t.capable:
                why = budget_shortfall(i, t, f"the {self.spec.name} model a capable device trains", self.spec,
                                       self.state)
                if why:
                    refuse_budget(why, "mark the tier 'capable: false' to serve it the most accurate compressed "
                                       "model within its budget instead, or raise the budget")
            elif getattr(t, other) is not None:
                self.ctx.note(f"hybridcomp: devices.tiers.{i}.{other} is not read: algorithm.params.budget is "
                              f"{self.params.budget}, so tier '{t.name}' is served by its "
                              f"{'model_bytes' if other == 'memory_mb' else 'memory_mb'} alone")

    def _compressible_names(self) -> frozenset[str]:
        from fedslim.engine.run import compressible_names  # the engine's rule, so rung sizes match the wire

        return compressible_names(self.spec.build(), self.ctx.cfg.codec.targets)

    def tier_of(self, client: int) -> Any:
        return self.ctx.devices.tiers[int(self.assignment[client])]

    def eligible_clients(self, round_: int) -> list[int]:
        """Clients the engine samples from: the capable ones, plus served constrained ones once joined."""
        if self.params.constrained_join and round_ > self.join_round and self.join_rungs:
            joined = [c for c in range(self.ctx.num_clients)
                      if not self.tier_of(c).capable and self.tier_of(c).name in self.join_rungs]
            return sorted(self.capable + joined)
        return list(self.capable)

    def codec(self, rung: str) -> Codec:
        if rung not in self._codecs:
            r = self._rung_by_name(rung)
            self._codecs[rung] = build_pipeline(r.stages(self.params.scope), f"hybridcomp rung {rung}")
        return self._codecs[rung]

    def _rung_by_name(self, name: str) -> Rung:
        for r in ladder_rungs(self.params):
            if r.name == name:
                return r
        raise KeyError(name)

    def plan(self, round_: int, cohort: list[int]) -> list[ClientTask]:
        tasks = []
        for c in cohort:
            tier = self.tier_of(c)
            if tier.capable:
                tasks.append(self.ctx.train_task(round_, c, self.spec, self.state))
                continue
            rung = self.join_rungs[tier.name]
            _, masks = self._join_payload(round_, rung)
            # The engine encodes the global state with this rung's codec (bytes counted, the device
            # gets the decoded model); the mask is what that decoding leaves nonzero.
            tasks.append(self.ctx.train_task(round_, c, self.spec, self.state, param_masks=masks,
                                             down_codec=self.codec(rung)))
        return tasks

    def _join_payload(self, round_: int, rung: str) -> tuple[State, State]:
        if self._join_cache is None or self._join_cache[0] != round_:
            self._join_cache = (round_, {})
        cache = self._join_cache[1]
        if rung not in cache:
            _, decoded, _ = compress_state(self.state, self.codec(rung), self.compressible)
            masks = {k: (decoded[k] != 0).to(torch.float32) for k in self.compressible if k in decoded}
            cache[rung] = (decoded, masks)
        return cache[rung]

    def aggregate(self, round_: int, tasks: list[ClientTask], results: list[ClientResult]) -> dict[str, Any]:
        out = super().aggregate(round_, tasks, results)
        if self.params.constrained_join and round_ == self.join_round:
            ladder = self.build_ladder(write=False)
            choice = self.choose(ladder)
            self.join_rungs = {t: r for t, r in choice.items() if r is not None}
            self._note_join(round_)
            return {**out, "join_rungs": dict(self.join_rungs)}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "join_rungs": dict(self.join_rungs)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        super().load_state_dict(s)
        self.join_rungs = dict(s.get("join_rungs", {}))
        if self.join_rungs:  # a resumed run's summary still says who joined (the note is not checkpointed)
            self._note_join(self.join_round)

    def _note_join(self, round_: int) -> None:
        joined = ", ".join(f"{t}: {r}" for t, r in self.join_rungs.items()) or "none"
        self.ctx.note(f"hybridcomp: after round {round_} constrained tiers join with rungs ({joined})")

    # ------------------------------------------------------------------ the ladder
    def build_ladder(self, write: bool) -> list[dict[str, Any]]:
        """Encode, decode and evaluate every rung on the current global model."""
        from fedslim.metrics import evaluate

        ctx, p = self.ctx, self.params
        model = self.spec.build().to(ctx.device)
        test = ctx.bundle.test.to(ctx.device)
        act = activation_bytes(self.spec)
        rows = []
        best: dict[str, dict[str, Any]] = {}
        self._decoded = {}
        for r in ladder_rungs(p):
            payload, decoded, stats = compress_state(self.state, self.codec(r.name), self.compressible)
            numel = sum(decoded[k].numel() for k in self.compressible)
            row: dict[str, Any] = {
                "rung": r.name, "order": r.order, "amount": r.amount, "bytes": len(payload),
                "float32_bytes": stats["float32_bytes"], "ratio_vs_float32": stats["float32_bytes"] / len(payload),
                "nominal_sparsity": r.amount, "measured_sparsity": self._sparsity(decoded),
                "rounding_zeros": int(stats.get("rounding_zeros") or 0),
                "rounding_zero_share": int(stats.get("rounding_zeros") or 0) / numel if numel else 0.0,
                "compressed_numel": numel, "memory_bytes": len(payload) + act}
            if write and p.write_rungs:
                path = ctx.run_dir / "ladder" / f"rung_{r.name}.bin"
                atomic_write_bytes(path, payload)
                row["file"] = str(path.relative_to(ctx.run_dir))
                row["file_bytes"] = path.stat().st_size
            model.load_state_dict(decoded)
            m = evaluate(model, test, ctx.bundle.num_classes, batch_size=ctx.cfg.eval.batch_size,
                         topk=ctx.cfg.eval.topk)
            row.update({"acc": m["acc"], "f1_weighted": m["f1_weighted"], "f1_macro": m["f1_macro"],
                        "loss": m["loss"]})
            rows.append(row)
            # Keep decoded states only of rungs that are some tier's best so far: every rung of a large
            # model would take many times its size in memory, and the chosen ones are needed again.
            for t in self._constrained_tiers():
                if self._fits(row, t) and (t.name not in best or self._rank(row) > self._rank(best[t.name])):
                    best[t.name] = row
            wanted = {b["rung"] for b in best.values()}
            if r.name in wanted:
                self._decoded[r.name] = decoded
            self._decoded = {k: v for k, v in self._decoded.items() if k in wanted}
        return rows

    def _sparsity(self, state: State) -> float:
        """Zeros over all elements of the compressed tensors, as decoded (what a device holds)."""
        numel = sum(state[k].numel() for k in self.compressible)
        zeros = sum(int((state[k] == 0).sum()) for k in self.compressible)
        return zeros / numel if numel else 0.0

    def decoded(self, rung: str) -> State:
        """What a device decodes from ``rung`` of the current global model (every stage is
        deterministic, so encoding again gives the same model when the ladder did not keep it)."""
        if rung not in self._decoded:
            self._decoded[rung] = compress_state(self.state, self.codec(rung), self.compressible)[1]
        return self._decoded[rung]

    def budget_of(self, tier: Any) -> float:
        return float(tier.model_bytes) if self.params.budget == "model_bytes" else float(tier.memory_mb) * 1e6

    def _constrained_tiers(self) -> list[Any]:
        seen: dict[str, Any] = {}
        for t in self.ctx.devices.tiers:
            if not t.capable and t.name not in seen:
                seen[t.name] = t
        return list(seen.values())

    @property
    def _size_key(self) -> str:
        return "bytes" if self.params.budget == "model_bytes" else "memory_bytes"

    def _fits(self, row: dict[str, Any], tier: Any) -> bool:
        return row[self._size_key] <= self.budget_of(tier) and row[self.params.metric] >= self.params.min_metric

    def _rank(self, row: dict[str, Any]) -> tuple[float, float]:
        """Higher is better: the metric, then the smaller size."""
        return row[self.params.metric], -row[self._size_key]

    def choose(self, ladder: list[dict[str, Any]]) -> dict[str, str | None]:
        """Per constrained tier: the most accurate rung within budget (ties: the smaller, then the
        earlier in the ladder), or None."""
        out: dict[str, str | None] = {}
        for t in self._constrained_tiers():
            best = max((r for r in ladder if self._fits(r, t)), key=self._rank, default=None)
            out[t.name] = best["rung"] if best else None
        return out

    # ------------------------------------------------------------------ deployment
    def finalize(self) -> dict[str, Any]:
        ctx, p = self.ctx, self.params
        ladder = self.build_ladder(write=True)
        self._write_ladder(ladder)
        choice = self.choose(ladder)
        by_name = {r["rung"]: r for r in ladder}
        size_key = self._size_key
        good = [r for r in ladder if r[p.metric] >= p.min_metric]
        bar = f" of {p.metric} >= {p.min_metric:g}" if p.min_metric > 0 else ""
        unit = "B" if p.budget == "model_bytes" else "B of memory (encoded model + batch-1 activations)"
        for tier, rung in choice.items():
            if rung is None:
                t = next(x for x in ctx.devices.tiers if x.name == tier)
                members = [c for c in range(ctx.num_clients) if self.tier_of(c).name == tier]
                if not good:
                    # No rung passes min_metric: the budget is not the reason, whatever its size.
                    top = max(ladder, key=self._rank)
                    ctx.note(f"hybridcomp: tier '{tier}' ({len(members)} devices) is unserved: no rung reaches "
                             f"algorithm.params.min_metric ({p.metric} >= {p.min_metric:g}); the best, "
                             f"{top['rung']}, scores {top[p.metric]:.4f}")
                    continue
                smallest = min(good, key=lambda r: r[size_key])
                budget = (f"model_bytes {t.model_bytes:,} B" if p.budget == "model_bytes"
                          else f"memory_mb {t.memory_mb:g} ({self.budget_of(t):,.0f} B)")
                ctx.note(f"hybridcomp: tier '{tier}' ({len(members)} devices) is unserved: its budget {budget} is "
                         f"below the smallest rung{bar}, {smallest['rung']} at {smallest[size_key]:,} {unit}")

        split = "test" if ctx.cfg.data.local_test_fraction > 0 else "train"
        devices: list[dict[str, Any]] = []
        eval_tasks: list[ClientTask] = []
        finetune: list[ClientTask] = []
        final_round = ctx.cfg.federation.rounds + 1
        for c in range(ctx.num_clients):
            tier = self.tier_of(c)
            rung = "dense" if tier.capable else choice.get(tier.name)
            rec: dict[str, Any] = {"client": c, "tier": tier.name, "capable": tier.capable, "rung": rung,
                                   "served": rung is not None}
            if rung is not None:
                state = self.state if tier.capable else self.decoded(rung)
                # Capable devices already hold the global model; constrained ones download their rung.
                rec["bytes_down"] = 0 if tier.capable else by_name[rung]["bytes"]
                eval_tasks.append(ClientTask(client=c, round=final_round, spec=self.spec, state=state,
                                             kind="evaluate", extras={"split": split,
                                                                      "batch_size": ctx.cfg.eval.batch_size}))
                if p.finetune_epochs and not tier.capable:
                    masks = {k: (state[k] != 0).to(torch.float32) for k in self.compressible}
                    tr = ctx.local_train(ctx.cfg.federation.rounds)
                    train = LocalTrain(p.finetune_epochs, tr.batch_size, tr.optimizer, tr.lr, tr.grad_clip,
                                       tr.max_steps, tr.augment)
                    finetune.append(ClientTask(client=c, round=final_round, spec=self.spec, state=state,
                                               train=train, seed=ctx.task_seed(final_round, c, "finetune"),
                                               param_masks=masks))
            devices.append(rec)
        for r in ctx.backend.run(eval_tasks):
            devices[r.client]["local"] = r.extras["metrics"]
        if finetune:
            tuned_eval = []
            for r in ctx.backend.run(finetune):
                rung = devices[r.client]["rung"]
                start = self.decoded(rung)
                tuned = {k: start[k] + r.delta[k] for k in start}
                # Back into the rung's format: the device keeps a model of the size it was budgeted for.
                payload, decoded, _ = compress_state(tuned, self.codec(rung), self.compressible)
                devices[r.client]["bytes_after_finetune"] = len(payload)
                devices[r.client]["sparsity_after_finetune"] = self._sparsity(decoded)
                tuned_eval.append(ClientTask(client=r.client, round=final_round, spec=self.spec, state=decoded,
                                             kind="evaluate", extras={"split": split,
                                                                      "batch_size": ctx.cfg.eval.batch_size}))
            for r in ctx.backend.run(tuned_eval):
                devices[r.client]["local_finetuned"] = r.extras["metrics"]

        tiers = self._tier_table(devices, choice, by_name, split)
        self._write_devices(devices)
        deploy_bytes = sum(d.get("bytes_down", 0) for d in devices)
        return {"ladder": ladder, "tiers": tiers, "local_split": split,
                "deployment": {"bytes_down": deploy_bytes, "served": sum(d["served"] for d in devices),
                               "unserved": sum(not d["served"] for d in devices), "budget": p.budget,
                               "metric": p.metric},
                "join_rungs": dict(self.join_rungs)}

    def _tier_table(self, devices: list[dict[str, Any]], choice: dict[str, str | None],
                    by_name: dict[str, dict[str, Any]], split: str) -> dict[str, Any]:
        from fedslim.metrics import mean_metrics

        out: dict[str, Any] = {}
        for t in self.ctx.devices.tiers:
            if t.name in out:
                continue
            members = [d for d in devices if d["tier"] == t.name]
            served = [d for d in members if d["served"]]
            rung = "dense" if t.capable else choice.get(t.name)
            row: dict[str, Any] = {
                "capable": t.capable, "devices": len(members), "served": len(served), "rung": rung,
                "budget": None if t.capable else self.budget_of(t),
                "rung_bytes": by_name[rung]["bytes"] if rung else None,
                # what budget: memory compares with the budget (encoded size + batch-1 activations)
                "rung_memory_bytes": by_name[rung]["memory_bytes"] if rung else None,
                "ratio_vs_float32": by_name[rung]["ratio_vs_float32"] if rung else None,
                "bytes_down": sum(d.get("bytes_down", 0) for d in members),
                # capable devices trained on their training split: optimistic if that is what is scored
                "data": split if (split == "test" or not t.capable) else "train (seen in training)"}
            local = mean_metrics([d["local"] for d in served if "local" in d])
            row["local"] = local if local.get("n") else None
            tuned = mean_metrics([d["local_finetuned"] for d in served if "local_finetuned" in d])
            row["local_finetuned"] = tuned if tuned.get("n") else None
            out[t.name] = row
        return out

    # ------------------------------------------------------------------ output
    def _write_ladder(self, ladder: list[dict[str, Any]]) -> None:
        run_dir = self.ctx.run_dir
        cols = ["rung", "order", "amount", "bytes", "file_bytes", "float32_bytes", "ratio_vs_float32",
                "nominal_sparsity", "measured_sparsity", "rounding_zeros", "rounding_zero_share",
                "compressed_numel", "memory_bytes", "acc", "f1_weighted", "f1_macro", "loss", "file"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in ladder:
            w.writerow(r)
        atomic_write_text(run_dir / "ladder.csv", buf.getvalue())
        atomic_write_text(run_dir / "ladder.json", to_json(ladder) + "\n")
        atomic_write_text(run_dir / "ladder.txt", "\n".join(ladder_table(ladder)) + "\n")
        self._plot(ladder)

    def _write_devices(self, devices: list[dict[str, Any]]) -> None:
        cols = ["client", "tier", "capable", "served", "rung", "bytes_down", "n", "acc", "f1_weighted",
                "acc_finetuned", "f1_weighted_finetuned", "bytes_after_finetune", "sparsity_after_finetune"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for d in devices:
            loc, tun = d.get("local") or {}, d.get("local_finetuned") or {}
            w.writerow({**d, "n": loc.get("n"), "acc": loc.get("acc"), "f1_weighted": loc.get("f1_weighted"),
                        "acc_finetuned": tun.get("acc"), "f1_weighted_finetuned": tun.get("f1_weighted")})
        atomic_write_text(self.ctx.run_dir / "devices.csv", buf.getvalue())

    def _plot(self, ladder: list[dict[str, Any]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from fedslim.report import _plain_log_ticks

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
        styles = {"prune_int8": "o-", "int8_prune": "s--", "prune": "^:"}
        for ax, key, label in ((axes[0], "acc", "test accuracy (%)"), (axes[1], "f1_weighted", "weighted F1 (%)")):
            annotated = False
            for order, style in styles.items():
                pts = [r for r in ladder if r["order"] == order]
                if not pts:
                    continue
                ax.plot([r["ratio_vs_float32"] for r in pts], [r[key] * 100 for r in pts], style, ms=4,
                        label={"prune_int8": "prune -> int8", "int8_prune": "int8 -> prune",
                               "prune": "prune (float32)"}[order])
                for r in pts if not annotated else []:  # the orders share ratios: label the amounts once
                    ax.annotate(f"{r['amount']:g}", (r["ratio_vs_float32"], r[key] * 100), fontsize=6,
                                xytext=(2, 2), textcoords="offset points")
                annotated = True
            for r in ladder:
                if r["order"] in ("dense", "int8"):
                    ax.plot([r["ratio_vs_float32"]], [r[key] * 100], "k*" if r["order"] == "dense" else "kD",
                            ms=7, label=r["rung"])
            ax.set_xscale("log")
            _plain_log_ticks(ax)
            ax.set_xlabel("compression ratio vs float32 (encoded bytes)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{self.ctx.cfg.name}: compression ladder ({self.spec.name}, amounts annotated)", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(self.ctx.run_dir / "ladder.png", buf.getvalue())

    def describe_summary(self, s: dict[str, Any]) -> list[str]:
        """Lines the engine prints under the run's table: the ladder and the per-tier results."""
        lines = ["", "compression ladder (test set; sizes are encoded bytes = file sizes):"]
        lines += ladder_table(s.get("ladder", []))
        lines += ["", f"devices by tier (metric for 'most accurate': {s['deployment']['metric']}, budget: "
                      f"{s['deployment']['budget']}; local data: {s['local_split']} split):"]
        # A memory budget is compared with the encoded size plus the activations, not with the bytes
        # column: show that sum beside the budget, or a served tier can look over budget against a
        # smaller, unserved one.
        memory = s["deployment"]["budget"] == "memory"
        mem_head = f" {'memory':>11}" if memory else ""
        header = (f"{'tier':<10} {'capable':>7} {'devices':>7} {'served':>6} {'rung':<16} {'bytes':>11} "
                  f"{'ratio':>6}{mem_head} {'budget':>11} {'local acc':>9} {'local f1w':>9} {'tuned acc':>9}")
        lines += [header, "-" * len(header)]
        for name, t in s.get("tiers", {}).items():
            loc, tun = t.get("local") or {}, t.get("local_finetuned") or {}
            mem = f" {_num(t.get('rung_memory_bytes')):>11}" if memory else ""
            lines.append(
                f"{name[:10]:<10} {'yes' if t['capable'] else 'no':>7} {t['devices']:>7} {t['served']:>6} "
                f"{(t['rung'] or 'UNSERVED'):<16} {_num(t['rung_bytes']):>11} "
                f"{_fmt(t['ratio_vs_float32'], '.2f'):>6}{mem} "
                f"{_num(t['budget']):>11} {_pct(loc.get('acc')):>9} {_pct(loc.get('f1_weighted')):>9} "
                f"{_pct(tun.get('acc')):>9}")
        if memory:
            lines.append("memory = encoded rung + float32 activations of batch-1 inference; budget = memory_mb "
                         "in bytes (10^6 per MB)")
        if s.get("local"):  # eval.local was on
            # Same tier names, different models: without this the two local figures of a tier read as
            # one measurement that disagrees with itself.
            lines.append("local acc here: each device's served rung; the local/<tier> rows of the table above "
                         "score the global (dense) model on the same tiers' local test splits")
        d = s["deployment"]
        lines.append(f"deployment: {d['served']} devices served, {d['unserved']} unserved, "
                     f"{d['bytes_down']:,} bytes sent to constrained devices")
        return lines


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}"


def ladder_table(ladder: list[dict[str, Any]]) -> list[str]:
    header = (f"{'rung':<18} {'bytes':>11} {'ratio':>6} {'nominal':>7} {'measured':>8} {'round0':>8} "
              f"{'acc':>6} {'f1_w':>6}")
    lines = [header, "-" * len(header)]
    for r in ladder:
        lines.append(f"{r['rung']:<18} {r['bytes']:>11,} {r['ratio_vs_float32']:>6.2f} "
                     f"{r['nominal_sparsity'] * 100:>6.1f}% {r['measured_sparsity'] * 100:>7.2f}% "
                     f"{r['rounding_zeros']:>8,} {r['acc'] * 100:>6.2f} {r['f1_weighted'] * 100:>6.2f}")
    return lines
