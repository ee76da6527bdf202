"""DAC — a differentiable channel search on a MobileNet-V2 supernet, one architecture per device budget,
and the resulting heterogeneous architectures federated together.

Rounds 1 to ``search_rounds`` are the federated search. Every expanding block of the supernet (the
configured MobileNet-V2, every channel present) carries a channel gate on its expanded channels
(:class:`fedslim.models.mobilenet.ChannelGate`): with ``gate_forward: hard`` (default) the forward
pass keeps a channel where its logit is at least 0 and drops it elsewhere, and the backward pass
uses the gradient of ``sigmoid(logit)`` (straight-through), so the supernet trains as the
architecture its gates would extract; ``soft`` multiplies by ``sigmoid(logit)``. Each device tier has
its own gate logits and its own budget of MACs and parameters. A client trains the supernet's weights
with the local optimizer and its tier's logits with Adam at ``gate_lr``, on

    cross-entropy + entropy_weight * mean binary entropy of the gates
                  + bound_weight * |max(E[MACs] / MACs budget, E[params] / params budget) - 1|,

where the expected cost counts each channel the forward pass keeps (hard gates, with the sigmoid's
gradient) or by ``sigmoid(logit)`` (soft gates): MACs and parameters of
MobileNet-V2 are exactly linear in the expanded channel counts (:class:`CostModel`, measured with
the model profiler). The bound term holds the gated network at its binding budget from either side
(over it the gates close, under it they open), and the entropy term drives the gates to 0
or 1. The server averages the weights over every client (HeteroFL's sum-and-count, static BN, label
rows) and each tier's logits over that tier's clients.

After the last search round each tier's architecture is extracted: the channels whose gate is at
least 1/2 (one per block at least); then, while the architecture exceeds the tier's MACs or
parameter budget (or its ``model_bytes`` / ``memory_mb``), the kept channel with the lowest gate
goes, or, while budget is left (``fill_budget``), the strongest channel below 1/2 comes
in. The budgets hold exactly, whatever the gates did. From then on every tier trains its own
architecture: the supernet's channels it kept, at their positions, and the server averages each
global element over the clients whose architecture keeps it (:func:`fedslim.algorithms.submodel.combine`),
with HeteroFL's static BN query, masked loss and per-level evaluation.

A tier's budget is, unless ``budgets`` names it, the MACs of the tier's width-``width`` MobileNet-V2
(the sub-model HeteroFL would give it), so that DAC and HeteroFL compare at equal compute on one
device population, and as many parameters as its ``model_bytes`` holds in float32 (no limit without).

Where this departs from the reference code, and why: the reference federated one searched
architecture; here each budget gets its own and they are trained together, each global channel
averaged over the clients that keep it. The search is part of the run (its traffic, time and metrics
are counted, its rows say ``phase: search``), and budgets are enforced exactly at extraction. The
gates are dropped at extraction: with hard gates the supernet already computed with 0/1 gates, so
the extracted architecture computes what the search trained (until extraction cuts or fills
channels to meet the budget); with soft gates a kept channel's gate is near 1 once the entropy term
has done its work, and the rounds that follow adapt the weights.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedslim.algorithms.base import budget_shortfall, refuse_budget
from fedslim.algorithms.heterofl import HeteroFL, SubmodelParams
from fedslim.algorithms.submodel import IndexPlan, extract, meta_model, state_shapes
from fedslim.config import ConfigError, RunConfig
from fedslim.data.types import TensorData
from fedslim.engine.client import load_state, train_model
from fedslim.engine.server_opt import ServerOptimizer
from fedslim.engine.task import ClientResult, ClientTask, ModelSpec, State
from fedslim.models.mobilenet import ChannelGate
from fedslim.registry import ALGORITHMS, CLIENT_PROCEDURES

MODEL = "mobilenetv2"


class TierBudget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    macs: float | None = Field(None, gt=0, description="MACs per sample: a share of the supernet's when at most 1, "
                                                      "else a count (none: no MACs limit)")
    params: float | None = Field(None, gt=0, description="parameters: a share of the supernet's when at most 1, "
                                                        "else a count (none: no parameter limit)")


class DACParams(SubmodelParams):
    search_rounds: int = Field(1, ge=1, description="rounds of federated search before the architectures are "
                                                    "extracted (rounds 1 to search_rounds)")
    search_epochs: int | None = Field(None, ge=1, description="local epochs of a search task (default: train.epochs)")
    gate_lr: float = Field(0.1, gt=0, description="Adam learning rate of the gate logits in the search")
    gate_init: float = Field(1.0, description="initial gate logit of every channel (1: gates at 0.73)")
    entropy_weight: float = Field(0.5, ge=0, description="weight of the gates' mean binary entropy (drives "
                                                         "them to 0 or 1)")
    bound_weight: float = Field(2.0, ge=0, description="weight of the gated network's relative distance from "
                                                      "its binding budget (MACs or params)")
    gate_forward: Literal["hard", "soft"] = Field(
        "hard", description="hard: the forward pass uses 0/1 gates (logit >= 0 keeps a channel) with the sigmoid's "
                            "gradient, so the supernet trains as the architecture it would extract; soft: sigmoid")
    fill_budget: bool = Field(True, description="after thresholding, add the strongest remaining channels while "
                                                "the budgets still hold (false: the thresholded gates only)")
    budgets: dict[str, TierBudget] = Field(
        default_factory=dict, description="per device tier name, its MACs and params budget; a tier not named "
                                          "gets the MACs of its width-'width' model and params within its model_bytes")

    # HeteroFL's width-level parameters, which dac has no use for: setting one is an error that says why.
    key_hints: ClassVar[dict[str, str]] = {
        k: f"dac's levels are the device tiers (devices.tiers), each with the architecture searched for its budget, "
           f"so HeteroFL's '{k}' does not apply; {what}"
        for k, what in (("rates", "budgets come from the tiers' widths or algorithm.params.budgets"),
                        ("model_split", "leave model_split unset"),
                        ("assignment", "a device trains its tier's architecture (devices.assignment says which)"),
                        ("scaler", "every architecture is cut from the supernet at rate 1, so nothing is scaled"))}

    # What HeteroFL's code reads of the parameters above, fixed for dac.
    @property
    def model_split(self) -> None:
        return None

    @property
    def scaler(self) -> bool:
        return False


@dataclass(frozen=True)
class CostModel:
    """MACs per sample and parameters of a MobileNet-V2 as functions of its expanded channel counts.

    Both are exactly linear in them (each expanded channel brings its expansion row, depthwise filter,
    projection column and norm entries, nothing else), so the model is the full network's cost and
    the cost of one channel of each block, measured with the profiler (:mod:`fedslim.models.profile`).
    """

    full: tuple[int, ...]  # expanded channels of every expanding block, supernet
    macs_full: int
    params_full: int
    macs_per: tuple[int, ...]
    params_per: tuple[int, ...]

    @classmethod
    def of(cls, spec: ModelSpec) -> CostModel:
        from fedslim.models.profile import profile_spec

        model = meta_model(spec)
        full = tuple(int(b.depthwise[0].out_channels) for b in model.blocks if b.expand is not None)

        def prof(hidden: tuple[int, ...]) -> dict[str, int]:
            opts = {k: v for k, v in spec.options if k != "gates"}
            return profile_spec(spec.name, spec.num_classes, spec.input_shape, spec.width,
                                **{**opts, "hidden_channels": hidden})

        top = prof(full)
        macs_per, params_per = [], []
        for i, h in enumerate(full):
            # One channel fewer (one more where the block has a single channel): the slope either way.
            step = -1 if h > 1 else 1
            other = prof(full[:i] + (h + step,) + full[i + 1:])
            macs_per.append((other["macs"] - top["macs"]) * step)
            params_per.append((other["params"] - top["params"]) * step)
        return cls(full, top["macs"], top["params"], tuple(macs_per), tuple(params_per))

    def macs(self, hidden: tuple[int, ...] | list[int]) -> int:
        return self.macs_full - sum(c * (f - h) for c, f, h in zip(self.macs_per, self.full, hidden, strict=True))

    def params(self, hidden: tuple[int, ...] | list[int]) -> int:
        return self.params_full - sum(c * (f - h) for c, f, h in zip(self.params_per, self.full, hidden, strict=True))


def _amount(value: float | None, whole: int) -> int:
    """A budget entry: none is the whole supernet's, up to 1 a share of it, above 1 a count."""
    if value is None:
        return whole
    return int(value * whole) if value <= 1 else int(value)


def gate_entropy(probs: torch.Tensor) -> torch.Tensor:
    p = probs.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log()).mean()


@CLIENT_PROCEDURES.register("dac_search", "DAC search: supernet weights and one tier's channel gates, with entropy "
                                          "and budget penalties")
def dac_search_procedure(task: ClientTask, data: TensorData, model: torch.nn.Module) -> ClientResult:
    """Local training of the gated supernet; ``task.extras`` carries the tier's budgets, the cost model's
    coefficients and the penalty weights. Returns the delta of the weights and of the gate logits."""
    x = task.extras
    dev = next(model.parameters()).device
    start = {k: v.to(dev) for k, v in task.state.items()}
    load_state(model, start)
    gates = [m.logits for m in model.modules() if isinstance(m, ChannelGate)]
    if len(gates) != len(x["macs_per"]):
        raise ValueError(f"dac_search: the model has {len(gates)} channel gates, the task's cost model "
                         f"{len(x['macs_per'])} blocks")
    for g in gates:
        g.requires_grad_(True)
    opt = torch.optim.Adam(gates, lr=float(x["gate_lr"]))
    macs_per = torch.tensor(x["macs_per"], dtype=torch.float64, device=dev)
    params_per = torch.tensor(x["params_per"], dtype=torch.float64, device=dev)
    full = torch.tensor(x["full"], dtype=torch.float64, device=dev)

    def expected(probs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        open_ = torch.stack([p.sum() for p in probs]).double()
        return (x["macs_full"] - (macs_per * (full - open_)).sum(),
                x["params_full"] - (params_per * (full - open_)).sum())

    hard = bool(x.get("hard", False))

    def counted(g: torch.Tensor) -> torch.Tensor:
        # Hard gates: the cost of the channels the forward pass keeps (what extraction would keep), with
        # the sigmoid's gradient, so the budget binds the architecture itself and not a soft average of it.
        p = torch.sigmoid(g)
        return (g >= 0).to(p.dtype) + (p - p.detach()) if hard else p

    def penalty() -> torch.Tensor:
        probs = [torch.sigmoid(g) for g in gates]
        macs, params = expected([counted(g) for g in gates])
        # The binding budget, met from either side: over it the gates close, under it they open, so the
        # search ends near the budget rather than wherever the entropy term left it.
        bound = (torch.maximum(macs / x["macs_budget"], params / x["params_budget"]) - 1).abs()
        return (x["entropy_weight"] * gate_entropy(torch.cat(probs))
                + x["bound_weight"] * bound.float())

    def after_step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        steps, loss, seen = train_model(model, task, data, penalty=penalty, after_step=after_step)
    finally:
        for g in gates:
            g.requires_grad_(False)
            g.grad = None
    with torch.no_grad():
        macs, params = expected([counted(g) for g in gates])
    new = {k: v.detach() for k, v in model.state_dict().items()}
    delta = {k: (new[k] - start[k]).contiguous().cpu() for k in start}
    return ClientResult(task.client, task.round, delta, len(data), steps, loss,
                        {"samples_processed": seen, "expected_macs": float(macs), "expected_params": float(params)})


def removal_order(probs: list[torch.Tensor], keep: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Kept channels (block, channel) from the lowest gate up, ties by block then channel: the order
    in which extraction drops channels to meet a budget."""
    cands = [(float(p[c]), b, int(c)) for b, (p, k) in enumerate(zip(probs, keep, strict=True))
             for c in torch.nonzero(k).flatten().tolist()]
    return [(b, c) for _, b, c in sorted(cands)]


@ALGORITHMS.register("dac", "DAC: differentiable channel-gate search on MobileNet-V2, one architecture per tier "
                            "budget, federated together by sum-and-count")
class DAC(HeteroFL):
    name = "dac"
    Params = DACParams
    params: DACParams

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.model.name != MODEL:
            raise ValueError(f"model.name: dac searches channel gates on MobileNet-V2's expanding blocks; "
                             f"allowed: {MODEL}, got {cfg.model.name!r}")
        for opt in ("hidden_channels", "gates"):
            if opt in cfg.model.options:
                raise ValueError(f"model.options.{opt}: dac sets it itself (the supernet has every channel, the "
                                 f"search adds gates); remove it")

    def tier_rates(self) -> dict[str, float]:
        """Every tier's architecture is cut from the full supernet; widths set budgets, not sub-models."""
        return {t.name: 1.0 for t in self.ctx.devices.tiers}

    def setup(self) -> None:
        super().setup()
        ctx, p = self.ctx, self.params
        rounds = ctx.cfg.federation.rounds
        if p.search_rounds >= rounds:
            raise ConfigError(f"algorithm.params.search_rounds: dac searches in rounds 1 to {p.search_rounds} and then "
                              f"trains the searched architectures, so federation.rounds ({rounds}) must exceed it; "
                              f"allowed: 1 to {rounds - 1}")
        gw = ctx.cfg.model.width
        track = not p.static_bn
        self.search_spec = ctx.spec(width=gw, track_running_stats=track, scaler_rate=1.0, gates=p.gate_forward)
        search_eval = ctx.spec(width=gw, track_running_stats=True, scaler_rate=1.0, gates=p.gate_forward)
        self.gate_keys = [k for k in meta_model(self.search_spec).state_dict() if k.endswith(".gate.logits")]
        self.gates: dict[str, State] = {
            label: {k: torch.full(s, float(p.gate_init)) for k, s in state_shapes(self.search_spec).items()
                    if k in self.gate_keys} for label in self.labels}
        for label in self.labels:
            self.train_specs[label] = self.search_spec
            self.eval_specs[label] = search_eval
        self.full_plan = self.layout.prefix_plan(state_shapes(self.global_spec))
        # Channel group of each gated block's expanded channels -> the block's place among the gated ones.
        self.block_of_group = {self.layout.member_of[(k.removesuffix("gate.logits") + "expand.0.weight", 0)][0]: i
                               for i, k in enumerate(self.gate_keys)}
        self.arch: dict[str, list[torch.Tensor]] | None = None
        self.arch_plans: dict[str, IndexPlan] = {}
        self.search_stats: dict[str, Any] = {}
        self.arch_note: str | None = None
        self.note_search_over_budget()

    def note_search_over_budget(self) -> None:
        """Say which tiers the search asks to train more than their budget holds: every search client
        trains the whole gated supernet; a tier's model_bytes and memory_mb bind only its architecture."""
        supernet = self._zeros(self.search_spec)
        rounds = self.params.search_rounds
        for i, t in enumerate(self.ctx.devices.tiers):
            why = budget_shortfall(i, t, "the gated supernet every search client trains", self.search_spec,
                                   supernet)
            if why:
                self.ctx.note(f"dac: in search round{'s' if rounds > 1 else ''} 1{f'-{rounds}' if rounds > 1 else ''}"
                              f", tier {t.name!r} trains beyond its budget ({why}); the budget binds the "
                              f"architecture it trains afterwards")

    # ------------------------------------------------------------------ budgets
    def check_budgets(self) -> None:
        """Resolve every tier's MACs and parameter budget and refuse, before the run folder is made, one that
        not even the smallest searchable architecture (one expanded channel per block) meets."""
        ctx, p = self.ctx, self.params
        tiers = ctx.devices.tiers
        names = [t.name for t in tiers]
        unknown = [k for k in p.budgets if k not in names]
        if unknown:
            raise ConfigError(f"algorithm.params.budgets: {unknown[0]!r} is not a device tier; allowed: "
                              f"{', '.join(names)} (the names in devices.tiers)")
        self.cost = CostModel.of(self.global_spec)
        cost = self.cost
        smallest = (1,) * len(cost.full)
        gw = ctx.cfg.model.width
        self.budgets: dict[str, dict[str, Any]] = {}
        for i, t in enumerate(tiers):
            b = p.budgets.get(t.name)
            if b is None:
                from fedslim.models.profile import profile_spec

                s = ctx.spec(width=gw * t.width)
                prof = profile_spec(s.name, s.num_classes, s.input_shape, s.width, **dict(s.options))
                # The compute of the tier's width: DAC cannot shrink the stem, block outputs or head, so the
                # width's parameter count would squeeze the expanded channels far below the width's own.
                # Parameters are bounded by the tier's model_bytes (float32) where it has one.
                macs, field = prof["macs"], f"devices.tiers.{i}.width"
                params = cost.params_full if t.model_bytes is None else min(cost.params_full, t.model_bytes // 4)
                source = f"width {t.width:g}" + ("" if t.model_bytes is None else ", model_bytes")
            else:
                macs, params = _amount(b.macs, cost.macs_full), _amount(b.params, cost.params_full)
                field = f"algorithm.params.budgets.{t.name}"
                source = "budgets"
            for what, have, need, whole in (("MACs", macs, cost.macs(smallest), cost.macs_full),
                                            ("params", params, cost.params(smallest), cost.params_full)):
                if have < need:
                    where = field if b is None else f"{field}.{what.lower()}"
                    hint = f" (or set algorithm.params.budgets.{t.name})" if b is None else ""
                    raise ConfigError(
                        f"{where}: tier {t.name!r} allows {have:,} {what}, but the smallest architecture dac can "
                        f"search ({MODEL} at model.width {gw:g}, one expanded channel per block) has {need:,} (the "
                        f"supernet {whole:,}); allowed: at least {need:,}, or a share of at least "
                        f"{need / whole:.3f}{hint}")
            spec = self._arch_spec(smallest, track=not p.static_bn)
            why = budget_shortfall(i, t, "the smallest architecture dac can search (one expanded channel per block)",
                                   spec, self._zeros(spec))
            if why:
                refuse_budget(why, "raise the budget, or set model.width lower")
            self.budgets[t.name] = {"macs": macs, "params": params, "source": source}

    def _arch_spec(self, hidden: tuple[int, ...], *, track: bool) -> ModelSpec:
        return self.ctx.spec(width=self.ctx.cfg.model.width, track_running_stats=track, scaler_rate=1.0,
                             hidden_channels=tuple(int(h) for h in hidden))

    @staticmethod
    def _zeros(spec: ModelSpec) -> State:
        """A state of ``spec``'s shapes and dtypes (int64 BN counters too): what its payload would weigh."""
        return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in meta_model(spec).state_dict().items()}

    # ------------------------------------------------------------------ rounds
    def searching(self) -> bool:
        return self.arch is None

    def index_plan(self, round_: int, client: int, label: str) -> IndexPlan:
        return self.full_plan if self.searching() else self.arch_plans[label]

    def level_params(self, label: str) -> State:
        if self.searching():
            return {**self.state, **self.gates[label]}
        return extract(self.state, self.arch_plans[label])

    def search_extras(self, label: str) -> dict[str, Any]:
        p, c, b = self.params, self.cost, self.budgets[label]
        return {"gate_lr": p.gate_lr, "entropy_weight": p.entropy_weight, "bound_weight": p.bound_weight,
                "macs_budget": float(b["macs"]), "params_budget": float(b["params"]), "full": list(c.full),
                "macs_full": float(c.macs_full), "params_full": float(c.params_full),
                "macs_per": list(c.macs_per), "params_per": list(c.params_per), "level": label,
                "hard": p.gate_forward == "hard"}

    def plan(self, round_: int, cohort: list[int]) -> list[ClientTask]:
        if not self.searching():
            return super().plan(round_, cohort)
        self._pending = {}
        self._last_cohort = list(cohort)
        shared: dict[str, State] = {}  # one payload per tier, encoded once per round
        tasks = []
        for c in cohort:
            label = self.level_of(round_, c)
            if label not in shared:
                shared[label] = self.level_params(label)
            mask = self.client_labels(c) if self.masked else None
            t = self.ctx.train_task(round_, c, self.search_spec, shared[label], label_mask=mask, kind="dac_search",
                                    extras=self.search_extras(label))
            if self.params.search_epochs is not None and t.train is not None:
                t.train = dataclasses.replace(t.train, epochs=self.params.search_epochs)
            tasks.append(t)
            self._pending[c] = (label, self.full_plan)
        return tasks

    def aggregate(self, round_: int, tasks: list[ClientTask], results: list[ClientResult]) -> dict[str, Any]:
        if not self.searching():
            return super().aggregate(round_, tasks, results)
        extra: dict[str, Any] = {"phase": "search", "levels": self.combine_results(results)}
        for label in self.labels:
            mine = [r for r in results if self._pending[r.client][0] == label and r.num_steps > 0]
            if not mine:
                continue
            w = [float(r.num_samples) if self.params.weighted else 1.0 for r in mine]
            for k in self.gate_keys:
                step = sum(wi * r.delta[k].double() for wi, r in zip(w, mine, strict=True)) / sum(w)
                self.gates[label][k] = self.gates[label][k] + step.float()
        self._version += 1
        extra["gates_open"] = {label: self.open_share(label) for label in self.labels}
        # What the gated networks cost when the clients finished, against the budgets: whether the search
        # met them itself or extraction will have to cut.
        extra["expected_macs"] = {label: sum(r.extras["expected_macs"] for r in rs) / len(rs) for label in self.labels
                                  if (rs := [r for r in results if self._pending[r.client][0] == label
                                             and "expected_macs" in r.extras])}
        if round_ == self.params.search_rounds:
            self.finish_search()
            extra["architectures"] = {label: s["hidden_channels"] for label, s in self.search_stats.items()}
        self.query_bn_if_evaluated(round_, extra)
        return extra

    def open_share(self, label: str) -> float:
        probs = torch.cat([torch.sigmoid(self.gates[label][k]) for k in self.gate_keys])
        return float((probs >= 0.5).float().mean())

    # ------------------------------------------------------------------ extraction
    def architecture(self, i: int, label: str) -> list[torch.Tensor]:
        """The channels tier ``label`` keeps in every expanding block (sorted indices): gates at or above
        1/2 (the strongest one where none is); then, lowest gate first, fewer until the tier's
        budgets hold, or, with ``fill_budget``, highest gate first, more while they still hold."""
        probs = [torch.sigmoid(self.gates[label][k].double()) for k in self.gate_keys]
        keep = [pr >= 0.5 for pr in probs]
        for pr, k in zip(probs, keep, strict=True):
            if not bool(k.any()):
                k[int(torch.argmax(pr))] = True
        counts = [int(k.sum()) for k in keep]
        budget = self.budgets[label]
        tier = self.ctx.devices.tiers[i]

        def fits(hidden: list[int]) -> bool:
            if self.cost.macs(hidden) > budget["macs"] or self.cost.params(hidden) > budget["params"]:
                return False
            spec = self._arch_spec(tuple(hidden), track=not self.params.static_bn)
            return budget_shortfall(i, tier, "", spec, self._zeros(spec)) is None

        if fits(counts):
            if not self.params.fill_budget:
                return [torch.nonzero(k).flatten() for k in keep]
            sign, steps = 1, removal_order(probs, [~k for k in keep])[::-1]
        else:
            # Each removal that leaves its block a channel: prefixes of these are the candidates.
            left, steps = list(counts), []
            for b, c in removal_order(probs, keep):
                if left[b] > 1:
                    left[b] -= 1
                    steps.append((b, c))
            sign = -1

        def ok(n: int) -> bool:
            h = list(counts)
            for b, _ in steps[:n]:
                h[b] += sign
            return fits(h)

        # Costs grow with every addition and shrink with every removal, so the answer is a bisection:
        # the most additions that still fit, or the fewest removals that fit (all of them do: the
        # smallest architecture was checked at set-up).
        candidates = range(len(steps) + 1)
        if sign > 0:
            lo = bisect.bisect_left(candidates, True, key=lambda n: not ok(n)) - 1
        else:
            lo = bisect.bisect_left(candidates, True, key=ok)
        for b, c in steps[:lo]:
            keep[b][c] = sign > 0
        return [torch.nonzero(k).flatten() for k in keep]

    def finish_search(self) -> None:
        arch = {label: self.architecture(i, label) for i, label in enumerate(self.labels)}
        self.search_stats = {}
        for label, kept in arch.items():
            hidden = [len(k) for k in kept]
            b = self.budgets[label]
            self.search_stats[label] = {
                "hidden_channels": hidden, "kept": sum(hidden), "of": sum(self.cost.full),
                "macs": self.cost.macs(hidden), "params": self.cost.params(hidden),
                "budget_macs": b["macs"], "budget_params": b["params"], "budget_source": b["source"],
                "gates_open": self.open_share(label)}
        self.install(arch)
        # A fresh server optimizer: the search's momentum belongs to the gated supernet.
        self.server_opt = ServerOptimizer(self.ctx.cfg.federation.server_optimizer)
        self.arch_note = self.describe_search()
        self.ctx.note(self.arch_note)

    def install(self, arch: dict[str, list[torch.Tensor]]) -> None:
        self.arch = arch
        for label, kept in arch.items():
            hidden = tuple(len(k) for k in kept)
            self.train_specs[label] = self._arch_spec(hidden, track=not self.params.static_bn)
            self.eval_specs[label] = self._arch_spec(hidden, track=True)
            self.sub_shapes[label] = state_shapes(self.train_specs[label])
            self.arch_plans[label] = self.layout.plan(
                self.sub_shapes[label], lambda gid, _n, _k, kept=kept: kept[self.block_of_group[gid]])
        self._version += 1

    def describe_search(self) -> str:
        parts = []
        for label, s in self.search_stats.items():
            parts.append(f"{label}: {s['kept']:,} of {s['of']:,} expanded channels, {s['macs']:,} MACs "
                         f"(budget {s['budget_macs']:,}), {s['params']:,} params (budget {s['budget_params']:,})")
        return f"dac: architectures searched in {self.params.search_rounds} round(s): " + "; ".join(parts)

    # ------------------------------------------------------------------ reporting and checkpoints
    def summary(self) -> dict[str, Any]:
        out = super().summary()
        for lv in out.get("levels", {}).values():
            lv["rate"] = None  # every architecture is cut at rate 1; its channels are in the dac entry
        if self.search_stats:
            out["dac"] = {"search_rounds": self.params.search_rounds, "supernet_macs": self.cost.macs_full,
                          "supernet_params": self.cost.params_full, "tiers": self.search_stats}
        return out

    def describe_summary(self, s: dict[str, Any]) -> list[str]:
        lines = super().describe_summary(s)
        d = s.get("dac")
        if d:
            lines.append(f"dac architectures (supernet {d['supernet_macs']:,} MACs, {d['supernet_params']:,} params):")
            for label, t in d["tiers"].items():
                lines.append(f"  {label:<8} {t['kept']:,}/{t['of']:,} expanded channels  MACs {t['macs']:,} "
                             f"(budget {t['budget_macs']:,})  params {t['params']:,} (budget {t['budget_params']:,}, "
                             f"from {t['budget_source']})")
        return lines

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gates": self.gates, "arch": self.arch,
                "search_stats": dict(self.search_stats), "arch_note": self.arch_note}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        super().load_state_dict(s)
        self.gates = {k: dict(v) for k, v in s["gates"].items()}
        self.search_stats = dict(s.get("search_stats") or {})
        self.arch_note = s.get("arch_note")
        if s.get("arch") is not None:
            self.install(s["arch"])
        if self.arch_note:  # notes are not checkpointed; a resumed run's summary still says what was searched
            self.ctx.note(self.arch_note)
