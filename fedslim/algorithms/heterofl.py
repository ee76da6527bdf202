"""HeteroFL — Diao, Ding & Tarokh, "HeteroFL: Computation and Communication Efficient Federated
Learning for Heterogeneous Clients", ICLR 2021 (reference code: github.com/diaoenmao/HeteroFL).

Each client trains the sub-model of width ``rate`` cut from the global model (the first
``ceil(rate * C)`` channels of every hidden layer; the classifier keeps all classes), with a Scaler
dividing activations by ``rate`` during training, static BatchNorm (batch statistics only, nothing
tracked) and, for label-skewed data, cross-entropy on masked logits (classes the client lacks set
to 0). The server averages each global element over the clients whose sub-model holds it (in the
output layer only the rows of each client's labels), leaves the rest alone, and before evaluation
obtains BatchNorm statistics for every rate level by querying clients.

Where this departs from the reference code, and why:

* BN statistics come from a query of the clients' statistics over their local data (the paper's
  privacy-preserving sBN), pooled exactly (count-weighted means and variances), not from a pass of
  the server over the central training set, which a federated server does not have. The query is
  real traffic and its bytes are reported (``bn_query`` in metrics and summary).
* The global model's rate is the largest rate in ``model_split`` (the reference takes the first
  letter, which is the largest in every published setting).
* Fixed assignment splits clients into levels by largest remainder (the reference floors the
  shares and pads with the last level); dynamic assignment re-draws each client's level every
  round from the proportions, as the reference does, from a seeded stream.
* Clients return deltas; the sum-and-count mean of ``start + delta`` over holders equals the
  reference's mean of the returned parameters, and lets a server optimizer act on the update.
  ``weighted: true`` weights each holder by its sample count (the reference counts clients).
* Local accuracy is measured on each client's held-out local split (``data.local_test_fraction``)
  with its own level's model, logits outside its labels excluded; the reference uses the global
  model on a label-matched share of the central test set (``local_model: global`` picks the global
  model here).
"""

from __future__ import annotations

import re
import time
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from torch import nn

from fedslim.algorithms.base import Algorithm, budget_shortfall, check_tiers, refuse_budget
from fedslim.algorithms.submodel import (
    ChannelLayout,
    Contribution,
    IndexPlan,
    combine,
    extract,
    merge_bn_stats,
    state_shapes,
)
from fedslim.codecs import pack_exact
from fedslim.config import ConfigError, DeviceTier, RunConfig
from fedslim.devices import split_counts
from fedslim.engine.server_opt import ServerOptimizer
from fedslim.engine.task import ClientResult, ClientTask, ModelSpec, State
from fedslim.models.layers import batch_norms
from fedslim.registry import ALGORITHMS
from fedslim.rng import np_gen

PAPER_RATES = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
_SPLIT = re.compile(r"^[A-Za-z]\d*(-[A-Za-z]\d*)*$")
# Partitions that keep every client's label distribution close to the population's.
_LABEL_BALANCED = {"iid", "quantity"}


def parse_model_split(text: str, rates: dict[str, float], *, quote: bool = True) -> list[tuple[str, float, int]]:
    """'a1-b1-c1' -> [(letter, rate, share)]; a letter without a number has share 1. ``quote=False``
    leaves the offending text out of the error (the config error adds it as '(got ...)')."""
    form = ("expected levels like 'a1-b1-c1-d1-e1' or 'a2-b8' (a letter from rates "
            f"{{{', '.join(sorted(rates))}}} with an optional integer share, joined by '-')")
    got = f", got {text!r}" if quote else ""
    if not isinstance(text, str) or not _SPLIT.match(text.strip()):
        raise ValueError(f"{form}{got}")
    out, seen = [], set()
    for part in text.strip().split("-"):
        letter, share = part[0], int(part[1:] or 1)
        if letter not in rates:
            raise ValueError(f"{form}; '{letter}' is not in rates{got}")
        if letter in seen:
            raise ValueError(f"{form}; '{letter}' appears twice{got}")
        if share < 1:
            raise ValueError(f"{form}; shares must be >= 1{got}")
        seen.add(letter)
        out.append((letter, float(rates[letter]), share))
    return out


class WidthLevelParams(BaseModel):
    """How HeteroFL-style methods turn device tiers or the paper's level letters into width rates."""

    model_config = ConfigDict(extra="forbid")

    rates: dict[str, float] = Field(default_factory=lambda: dict(PAPER_RATES),
                                    description="width rate of each level letter")
    model_split: str | None = Field(
        None, description="levels and shares in the paper's notation ('a1-b1-c1-d1-e1', 'a2-b8'); "
                          "none: one level per devices.tiers entry, at its width, assigned as the devices are")
    assignment: Literal["fixed", "dynamic"] = Field(
        "fixed", description="fixed: levels by client index; dynamic: re-drawn every round (model_split only)")
    scaler: bool = Field(True, description="divide activations by rate / global rate while training")

    @field_validator("rates")
    @classmethod
    def _check_rates(cls, v: dict[str, float]) -> dict[str, float]:
        for k, r in v.items():
            if len(k) != 1 or not k.isalpha():
                raise ValueError(f"level names must be single letters, got {k!r}")
            if not 0 < r <= 1:
                raise ValueError(f"rate of '{k}' must be in (0, 1], got {r}")
        return v

    @field_validator("model_split")
    @classmethod
    def _check_split(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            parse_model_split(v, info.data.get("rates", PAPER_RATES), quote=False)
        return v


class SubmodelParams(BaseModel):
    """What every sum-and-count method over sub-models shares: static BN and its query, the masked loss,
    how holders are weighted, and which model local accuracy uses."""

    model_config = ConfigDict(extra="forbid")

    static_bn: bool = Field(True, description="no running BN statistics in training; query clients before eval")
    masked_loss: bool | Literal["auto"] = Field(
        "auto", description="cross-entropy on logits masked to the client's labels; auto: unless the "
                            "partition is iid or quantity")
    label_rows: bool = Field(True, description="output-layer rows updated only from clients holding the label")
    weighted: bool = Field(False, description="weight holders by sample count (reference: plain count)")
    bn_query_clients: Literal["all", "cohort"] = Field(
        "all", description="clients asked for BN statistics at eval rounds: every client or the round's cohort")
    bn_query_max_samples: int | None = Field(None, ge=2, description="per client, a seeded subset (none: all)")
    bn_query_batch_size: int = Field(500, ge=2, description="forward batch for the BN query")
    local_model: Literal["own", "global"] = Field(
        "own", description="model used for each client's local accuracy: its own level or the global model")

    @field_validator("masked_loss", mode="before")
    @classmethod
    def _check_masked_loss(cls, v: Any) -> Any:
        # Checked here: the union's own errors name 'masked_loss.bool' and leave out 'auto'.
        if isinstance(v, bool) or v == "auto":
            return v
        raise ValueError("must be true, false or 'auto'")


class HeteroFLParams(SubmodelParams, WidthLevelParams):
    """HeteroFL's, FedRolex's and Federated Dropout's parameters (the width levels first)."""


@ALGORITHMS.register("heterofl", "HeteroFL (Diao et al. 2021): prefix sub-models, sum-and-count, static BN")
class HeteroFL(Algorithm):
    name = "heterofl"
    Params = HeteroFLParams
    params: HeteroFLParams
    # One index plan per level and round (so one payload per level); False: one per client.
    shared_plan: ClassVar[bool] = True

    # ------------------------------------------------------------------ set-up
    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        # Widths are read (levels follow the tiers unless model_split is given, which notes that it
        # overrides them); every device trains, so capable: false would be ignored.
        check_tiers(cfg, cls.name, reads_width=True, reads_capable=False)

    def setup(self) -> None:
        ctx, p = self.ctx, self.params
        cfg = ctx.cfg
        if p.model_split is not None:
            split = parse_model_split(p.model_split, p.rates)
            self.level_rates = {letter: rate for letter, rate, _ in split}
            self.shares = np.array([share for _, _, share in split], dtype=float)
            if any(t.width != 1 for t in ctx.devices.tiers):
                ctx.note(f"{self.name}: model_split given, so devices.tiers widths are ignored (tiers still set "
                         f"speed and bandwidth)")
        else:
            self.level_rates = self.tier_rates()
            self.shares = np.array([t.share for t in ctx.devices.tiers], dtype=float)
            ignored = [k for k in ("assignment", "rates") if k in p.model_fields_set]
            if ignored:
                ctx.note(f"{self.name}: no model_split, so levels follow devices.tiers (their widths) and "
                         f"devices.assignment; algorithm.params.{' and algorithm.params.'.join(ignored)} "
                         f"{'is' if len(ignored) == 1 else 'are'} ignored")
        if "weighted" in cfg.federation.model_fields_set and cfg.federation.weighted != p.weighted:
            ctx.note(f"{self.name}: federation.weighted is not read (it is FedAvg's switch); each element is "
                     f"averaged over its holders {'by sample count' if p.weighted else 'counting clients'} as "
                     f"algorithm.params.weighted={str(p.weighted).lower()} says")
        self.labels = list(self.level_rates)
        self.global_rate = max(self.level_rates.values())
        gw = cfg.model.width
        track = not p.static_bn
        self.global_spec = ctx.spec(width=gw * self.global_rate, track_running_stats=track, scaler_rate=1.0)
        self.train_specs: dict[str, ModelSpec] = {}
        self.eval_specs: dict[str, ModelSpec] = {}
        for label, rate in self.level_rates.items():
            scale = rate / self.global_rate if p.scaler else 1.0
            self.train_specs[label] = ctx.spec(width=gw * rate, track_running_stats=track, scaler_rate=scale)
            # Evaluated models track statistics (installed from the query) and need no Scaler.
            self.eval_specs[label] = ctx.spec(width=gw * rate, track_running_stats=True, scaler_rate=1.0)
        self.state: State = ctx.init_state(self.global_spec)
        self.layout = ChannelLayout(self.global_spec)
        self.sub_shapes = {label: state_shapes(s) for label, s in self.train_specs.items()}
        self.prefix_plans = {label: self.layout.prefix_plan(s) for label, s in self.sub_shapes.items()}
        self.server_opt = ServerOptimizer(cfg.federation.server_optimizer)
        model = self.global_spec.build()
        self.param_keys = set(dict(model.named_parameters()))
        self.has_bn = any(True for _ in batch_norms(model))
        if p.static_bn and "static_bn" in p.model_fields_set and not self.has_bn:
            # Asked for explicitly, static BN on a model without BatchNorm would silently do nothing.
            raise ConfigError(f"algorithm.params.static_bn: true needs BatchNorm layers, but model {cfg.model.name} "
                              f"has none; set model.options.norm=bn (where the model offers it) or "
                              f"algorithm.params.static_bn=false (allowed: true, false)")
        self.check_scaler(model)
        self.check_budgets()
        self.masked = (cfg.data.partition.kind not in _LABEL_BALANCED) if p.masked_loss == "auto" else p.masked_loss
        n = ctx.num_clients
        self._fixed = np.repeat(np.arange(len(self.labels)), split_counts(list(self.shares), n))
        if self._fixed_assignment():
            counts = np.bincount(np.asarray(self.level_index(1), dtype=int), minlength=len(self.labels))
            empty = [label for label, c in zip(self.labels, counts, strict=True) if c == 0]
            if empty:
                field = "algorithm.params.model_split" if p.model_split is not None else "devices.tiers"
                ctx.note(f"{self.name}: {n} clients split by {field} give level{'s' if len(empty) > 1 else ''} "
                         f"{', '.join(empty)} no client; {'they are' if len(empty) > 1 else 'it is'} still evaluated, "
                         f"but no client trains at {'their' if len(empty) > 1 else 'its'} width")
        self._dynamic: dict[int, np.ndarray] = {}
        self._pending: dict[int, tuple[str, IndexPlan]] = {}
        self._version = 0  # bumped whenever self.state changes; keys the caches below
        self._bn: dict[str, State] = {}
        self._bn_version = -1
        self._eval_cache: tuple[int, dict[str, tuple[ModelSpec, State]]] | None = None
        self._last_cohort: list[int] = []
        self.bn_query_totals = {"queries": 0, "bytes_down": 0, "bytes_up": 0}
        self.check_channel_groups()

    def tier_rates(self) -> dict[str, float]:
        """Each device tier's level rate when no model_split is given: its width."""
        return {t.name: float(t.width) for t in self.ctx.devices.tiers}

    def check_budgets(self) -> None:
        """A tier's model_bytes and memory_mb must hold the sub-model its devices train: their own level's
        when levels follow the tiers, the largest level when model_split draws levels apart from them.
        Refused before the run folder is made (sizes need the dataset's shape, so not in check_config)."""
        tiers = self.ctx.devices.tiers
        if self.params.model_split is not None:
            top = max(self.labels, key=lambda lab: self.level_rates[lab])
            for i, t in enumerate(tiers):
                why = budget_shortfall(i, t, f"level '{top}' (rate {self.level_rates[top]:g}), which "
                                       f"algorithm.params.model_split may give any device,", self.train_specs[top],
                                       self.level_params(top))
                if why:
                    refuse_budget(why, "model_split assigns levels apart from devices.tiers, so every tier must "
                                       "hold the largest level; leave model_split unset to give each tier a "
                                       "sub-model at its own devices.tiers width, or raise the budget")
            return
        for i, t in enumerate(tiers):
            why = budget_shortfall(i, t, f"its width-{t.width:g} sub-model of {self.global_spec.name}",
                                   self.train_specs[t.name], self.level_params(t.name))
            if why:
                refuse_budget(why, self._width_hint(i, t))

    def _width_hint(self, i: int, tier: DeviceTier) -> str:
        """What to change: the widest of the tier's width halved up to 8 times that fits its budgets."""
        gw, p = self.ctx.cfg.model.width, self.params
        for k in range(1, 9):
            w = tier.width / 2 ** k
            scale = w / self.global_rate if p.scaler else 1.0
            spec = self.ctx.spec(width=gw * w, track_running_stats=not p.static_bn, scaler_rate=scale)
            try:
                state = self.ctx.init_state(spec)
            except Exception:  # noqa: BLE001 - too narrow to build: nothing narrower will do either
                break
            if budget_shortfall(i, tier, "", spec, state) is None:
                return f"lower devices.tiers.{i}.width to {w:g} or less (that sub-model fits), or raise the budget"
        return (f"no sub-model down to width {tier.width / 2 ** 8:g} fits; raise the budget, or set model.width "
                f"lower")

    def check_scaler(self, model: nn.Module) -> None:
        """Scaler assumes a normalization layer after it: without one, a rate-r sub-model's activations
        grow by 1/r at every scaled layer and nothing brings them back (seen: NaN updates within two
        rounds for LeNet-5 at rate 1/16 and lr 0.05), so say so before the run rather than after."""
        low = min(self.level_rates.values()) / self.global_rate
        if not self.params.scaler or low >= 1.0:
            return
        if any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) for m in model.modules()):
            return
        self.ctx.note(f"{self.name}: algorithm.params.scaler is on but model {self.ctx.cfg.model.name} has no "
                      f"normalization layer, so a rate-{low:g} sub-model's activations are multiplied by "
                      f"{1 / low:g} at every scaled layer in training and can diverge; set "
                      f"model.options.norm=bn (static BN, as in HeteroFL) or algorithm.params.scaler=false")

    def check_channel_groups(self) -> None:
        """Subclasses that choose channels need the model's coupling declaration; fail at set-up."""

    # ------------------------------------------------------------------ levels
    def level_index(self, round_: int) -> np.ndarray:
        """Level (index into ``self.labels``) of every client in ``round_``."""
        if self.params.model_split is None:
            return self.ctx.devices.assignment(round_)
        if self.params.assignment == "fixed":
            return self._fixed
        if round_ not in self._dynamic:
            probs = self.shares / self.shares.sum()
            self._dynamic = {round_: np_gen(self.ctx.seed, "heterofl_levels", round_).choice(
                len(self.labels), size=self.ctx.num_clients, p=probs)}
        return self._dynamic[round_]

    def level_of(self, round_: int, client: int) -> str:
        return self.labels[int(self.level_index(round_)[client])]

    def local_groups(self, round_: int, clients: list[int]) -> dict[str, list[int]] | None:
        """Local metrics per level when a model_split sets the levels (else levels are the device
        tiers, which the engine groups by already)."""
        if self.params.model_split is None:
            return None
        return {label: [c for c in clients if self.level_of(round_, c) == label] for label in self.labels}

    def client_labels(self, client: int) -> torch.Tensor | None:
        """Bool mask of the client's labels, or None when it holds every class."""
        mask = self.ctx.store.client_labels(client)
        return None if bool(mask.all()) else mask

    # ------------------------------------------------------------------ index plans (the hook)
    def index_plan(self, round_: int, client: int, label: str) -> IndexPlan:
        """Which global entries the client's sub-model holds: HeteroFL takes prefixes."""
        return self.prefix_plans[label]

    # ------------------------------------------------------------------ round
    def plan(self, round_: int, cohort: list[int]) -> list[ClientTask]:
        self._pending = {}
        self._last_cohort = list(cohort)
        # Clients of one level share one payload object, so the engine encodes it once per round.
        shared: dict[str, tuple[IndexPlan, State]] = {}
        tasks = []
        for c in cohort:
            label = self.level_of(round_, c)
            if self.shared_plan and label in shared:
                plan, sub = shared[label]
            else:
                plan = self.index_plan(round_, c, label)
                sub = extract(self.state, plan)
                if self.shared_plan:
                    shared[label] = (plan, sub)
            mask = self.client_labels(c) if self.masked else None
            tasks.append(self.ctx.train_task(round_, c, self.train_specs[label], sub, label_mask=mask))
            self._pending[c] = (label, plan)
        return tasks

    def aggregate(self, round_: int, tasks: list[ClientTask], results: list[ClientResult]) -> dict[str, Any]:
        extra: dict[str, Any] = {"levels": self.combine_results(results)}
        self.query_bn_if_evaluated(round_, extra)
        return extra

    def combine_results(self, results: list[ClientResult]) -> dict[str, int]:
        """Sum-and-count of the round's updates into the global model; returns the clients per level."""
        contributions, levels = [], {label: 0 for label in self.labels}
        for r in results:
            label, plan = self._pending[r.client]
            levels[label] += 1
            contributions.append(self.contribution(r, plan))
        delta = combine(self.state, contributions, self.layout.output_keys)
        if delta:
            self.state = self.server_opt.step(self.state, delta, self.param_keys)
            self._version += 1
        return levels

    def query_bn_if_evaluated(self, round_: int, extra: dict[str, Any]) -> None:
        """The static BN query, in rounds that are evaluated; its traffic goes into ``extra``."""
        cfg = self.ctx.cfg
        if self.needs_bn_query and (round_ % cfg.eval.every == 0 or round_ == cfg.federation.rounds):
            t0 = time.perf_counter()
            extra["bn_query"] = self.query_bn(round_, self._last_cohort)
            self.phase_seconds["bn_query_s"] = self.phase_seconds.get("bn_query_s", 0.0) + time.perf_counter() - t0

    def contribution(self, r: ClientResult, plan: IndexPlan) -> Contribution:
        """A client's update for :func:`combine`: its label rows (``label_rows``) and its weight."""
        rows = None
        if self.params.label_rows:
            mask = self.client_labels(r.client)
            rows = None if mask is None else torch.nonzero(mask).flatten()
        return Contribution(r.delta, plan, float(r.num_samples) if self.params.weighted else 1.0, rows)

    # ------------------------------------------------------------------ static BN query
    @property
    def needs_bn_query(self) -> bool:
        return self.params.static_bn and self.has_bn

    def level_params(self, label: str) -> State:
        """The prefix sub-model of level ``label`` as it is evaluated (no BN statistics)."""
        return extract(self.state, self.prefix_plans[label])

    def query_bn(self, round_: int, cohort: list[int], tally: bool = True) -> dict[str, int]:
        """Ask clients for the BatchNorm statistics of every level's model over their local data and
        pool them; runs through the backend like any client work. Returns the query's traffic, added
        to the run's totals when ``tally``."""
        p = self.params
        clients = list(range(self.ctx.num_clients)) if p.bn_query_clients == "all" or not cohort else cohort
        tasks, down = [], 0
        for label in self.labels:
            params = self.level_params(label)
            down += len(pack_exact(params)) * len(clients)
            extras = {"batch_size": p.bn_query_batch_size, "max_samples": p.bn_query_max_samples, "level": label}
            tasks += [ClientTask(client=c, round=round_, spec=self.eval_specs[label], state=params, kind="bn_stats",
                                 seed=self.ctx.task_seed(round_, c, "bn_stats"), extras=dict(extras))
                      for c in clients]
        results = self.ctx.backend.run(tasks)
        up = sum(len(pack_exact({**r.extras["bn"], **{f"{k}.n": torch.tensor(v) for k, v in
                                                       r.extras["bn_n"].items()}})) for r in results)
        for label in self.labels:
            shapes = state_shapes(self.eval_specs[label])
            layers = [k[: -len(".running_mean")] for k in shapes if k.endswith(".running_mean")]
            mine = [r for r in results if r.extras.get("level") == label]
            stats = merge_bn_stats(mine, layers)
            for layer in layers:  # a layer no client had data for: neutral statistics
                stats.setdefault(f"{layer}.running_mean", torch.zeros(shapes[f"{layer}.running_mean"]))
                stats.setdefault(f"{layer}.running_var", torch.ones(shapes[f"{layer}.running_var"]))
                stats.setdefault(f"{layer}.num_batches_tracked", torch.tensor(0, dtype=torch.long))
            self._bn[label] = stats
        self._bn_version = self._version
        if tally:
            t = self.bn_query_totals
            t["queries"] += 1
            t["bytes_down"] += down
            t["bytes_up"] += up
        return {"clients": len(clients), "bytes_down": down, "bytes_up": up}

    # ------------------------------------------------------------------ evaluation
    def eval_targets(self, round_: int) -> dict[str, tuple[ModelSpec, State]]:
        if self._eval_cache is not None and self._eval_cache[0] == self._version:
            return self._eval_cache[1]
        if self.needs_bn_query and self._bn_version != self._version:
            # Only after resuming a finished run (the summary evaluates again): the statistics were
            # queried and counted before the stop, so this repeat stays out of the totals.
            self.query_bn(round_, self._last_cohort, tally=False)
        out = {}
        for label in self.labels:
            state = self.level_params(label)
            if self.needs_bn_query:
                state = {**state, **self._bn[label]}
            out[label] = (self.eval_specs[label], state)
        self._eval_cache = (self._version, out)
        return out

    def local_eval_tasks(self, round_: int, clients: list[int]) -> list[ClientTask]:
        targets = self.eval_targets(round_)
        top = max(self.labels, key=lambda lab: self.level_rates[lab])
        tasks = []
        for c in clients:
            label = self.level_of(round_, c) if self.params.local_model == "own" else top
            spec, state = targets[label]
            tasks.append(ClientTask(client=c, round=round_, spec=spec, state=state, kind="evaluate",
                                    label_mask=self.client_labels(c),
                                    extras={"split": "test", "batch_size": self.ctx.cfg.eval.batch_size}))
        return tasks

    def summary(self) -> dict[str, Any]:
        from fedslim.models.profile import profile_spec

        levels = {}
        counts = np.bincount(np.asarray(self.level_index(1), dtype=int), minlength=len(self.labels))
        for i, label in enumerate(self.labels):
            s = self.eval_specs[label]
            prof = profile_spec(s.name, s.num_classes, s.input_shape, s.width, **dict(s.options))
            levels[label] = {"rate": self.level_rates[label], "width": s.width, "params": prof["params"],
                             "macs": prof["macs"], "clients_round1": int(counts[i]),
                             # what one client of the level is sent before any downlink codec
                             "submodel_bytes": len(pack_exact(self.level_params(label)))}
        return {"levels": levels, "bn_query": dict(self.bn_query_totals)}

    def _fixed_assignment(self) -> bool:
        """Whether every client keeps one level: model_split's own assignment, else the device tiers'."""
        p = self.params
        # devices.assignment 'random' shuffles the tiers once: every client keeps its tier, as with 'fixed'.
        return (p.assignment if p.model_split is not None else self.ctx.cfg.devices.assignment) != "dynamic"

    def describe_summary(self, s: dict[str, Any]) -> list[str]:
        """Lines the engine prints under the run's table: each level's sub-model and the BN query's
        traffic, which the table's bytes line (training traffic only) leaves out."""
        from fedslim.tables import fmt_bytes

        lines = [f"levels (sub-model = what one client is sent, before any downlink codec; clients "
                 f"{'of' if self._fixed_assignment() else 'in round 1 of'} {self.ctx.num_clients}):"]
        for label, lv in s.get("levels", {}).items():
            rate = "" if lv.get("rate") is None else f"rate {lv['rate']:<8g} "
            lines.append(f"  {label:<8} {rate}sub-model {fmt_bytes(lv['submodel_bytes']):>10}  "
                         f"clients {lv['clients_round1']}")
        q = s.get("bn_query") or {}
        if q.get("queries"):
            lines.append(f"static BN query (not in the bytes above): {q['queries']} "
                         f"quer{'y' if q['queries'] == 1 else 'ies'}, down {fmt_bytes(q['bytes_down'])}, "
                         f"up {fmt_bytes(q['bytes_up'])}")
        return lines

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "server_opt": self.server_opt.state_dict(),
                "bn_query_totals": dict(self.bn_query_totals)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.state = dict(s["state"])
        self.server_opt.load_state_dict(s["server_opt"])
        self.bn_query_totals = dict(s.get("bn_query_totals", self.bn_query_totals))
        self._version += 1
