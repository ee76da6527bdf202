"""The workload on Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend),
written as a Flower user would: a ``ClientApp`` whose train function builds the model, loads the
received arrays and runs a plain PyTorch loop on the client's data, and a ``ServerApp`` running
Flower's ``FedAvg`` strategy (sample-weighted, as fedslim's).

To run exactly fedslim's workload the strategy's ``configure_train`` sends each round's cohort (from
fedslim's sampler) to the first nodes, telling each which client it simulates, and clients draw
their batches from fedslim's per-(round, client) seed streams; every node process holds the whole
training set, as Flower's virtual clients do. HeteroFL is not in Flower; it is not run here (see
bench/README.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from workloads import Setup, Workload, accuracy, as_dict, batches, setup

_CACHE: dict[str, Setup] = {}
_TIMES: dict[str, Any] = {"start": {}, "end": {}, "acc": {}, "eval_s": 0.0, "updates": 0, "threads": None}


def _setup() -> Setup:
    """The data, once per node process (Ray actor)."""
    key = os.environ["FEDSLIM_BENCH_WORKLOAD"]
    if key not in _CACHE:
        _CACHE[key] = setup(Workload(**json.loads(key)), os.environ["FEDSLIM_BENCH_DATA"])
    return _CACHE[key]


def _model(s: Setup) -> torch.nn.Module:
    from fedslim.models import build_model

    return build_model(s.workload.model, num_classes=s.bundle.num_classes, input_shape=s.bundle.input_shape)


def make_apps() -> tuple[Any, Any]:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        if os.environ.get("FEDSLIM_BENCH_FLOWER_DEFAULTS") != "1":
            torch.set_num_threads(1)
        s = _setup()
        w = s.workload
        cfg = msg.content["config"]
        client, rnd = int(cfg["client"]), int(cfg["server-round"])
        model = _model(s)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.train()
        idx_all = s.parts[client]
        x, y = s.bundle.train.x[idx_all], s.bundle.train.y[idx_all]
        gen = torch.Generator().manual_seed(s.client_seed(rnd, client))
        torch.manual_seed(s.client_seed(rnd, client))
        opt = torch.optim.Adam(model.parameters(), lr=w.lr)
        for _ in range(w.epochs):
            for b in batches(len(y), w.batch_size, gen):
                loss = F.cross_entropy(model(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": len(y),
                                                       "torch-threads": torch.get_num_threads()})})
        return Message(content=content, reply_to=msg)

    class CohortFedAvg(FedAvg):
        """Flower's FedAvg, with fedslim's cohort in place of its own node sampling."""

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> list[Message]:
            _TIMES["start"][server_round] = time.perf_counter()
            cohort = _setup().cohorts[server_round - 1]
            nodes = sorted(grid.get_node_ids())
            return [Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
                {"server-round": server_round, "client": client})}), message_type=MessageType.TRAIN,
                dst_node_id=node) for node, client in zip(nodes, cohort, strict=False)]

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            out = super().aggregate_train(server_round, replies)
            _TIMES["end"][server_round] = time.perf_counter()
            _TIMES["updates"] += sum(1 for r in replies if not r.has_error())
            _TIMES["threads"] = max(int(r.content["metrics"]["torch-threads"]) for r in replies if not r.has_error())
            return out

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t = time.perf_counter()
        s = _setup()
        model = _model(s)
        model.load_state_dict(arrays.to_torch_state_dict())
        acc = accuracy(model, s.bundle.test.x, s.bundle.test.y)
        _TIMES["acc"][server_round] = acc
        _TIMES["eval_s"] += time.perf_counter() - t
        return MetricRecord({"accuracy": acc})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        s = _setup()
        strategy = CohortFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=s.workload.clients)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(s.init_state), num_rounds=s.workload.rounds,
                       evaluate_fn=evaluate)

    return server_app, client_app


def run_flower(w: Workload, data_dir: str, t0: float, defaults: bool = False) -> dict[str, Any]:
    """``defaults``: Flower's own client resources (2 CPUs per virtual client, so one client at a time
    on a 2-core machine, torch on the threads Ray gives it) instead of one CPU and one torch thread
    per client, two clients at a time."""
    from flwr.simulation import run_simulation

    if w.algorithm != "fedavg":
        raise SystemExit(f"flower: no {w.algorithm} here")
    # Node processes (Ray actors) inherit the environment: it tells them the workload.
    os.environ.update({"FEDSLIM_BENCH_WORKLOAD": json.dumps(as_dict(w)), "FEDSLIM_BENCH_DATA": data_dir,
                       "FEDSLIM_BENCH_FLOWER_DEFAULTS": "1" if defaults else "0"})
    logging.getLogger("flwr").setLevel(logging.WARNING)
    server_app, client_app = make_apps()
    cpus = os.cpu_count() or 1
    backend_config: dict[str, Any] = {"init_args": {"num_cpus": cpus, "include_dashboard": False}}
    if not defaults:
        backend_config["client_resources"] = {"num_cpus": 1, "num_gpus": 0.0}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=w.clients,
                   backend_config=backend_config)
    rounds = sorted(_TIMES["end"])
    if len(rounds) != w.rounds:
        raise SystemExit(f"flower: finished {len(rounds)} of {w.rounds} rounds")
    round_s = [_TIMES["end"][r] - _TIMES["start"][r] for r in rounds]
    # Clients at a time: Ray runs as many as the CPUs hold client_resources' num_cpus.
    workers = cpus // 2 if defaults else cpus
    return {"updates": _TIMES["updates"], "round_s": round_s, "startup_s": _TIMES["start"][1] - t0,
            "acc_round1": _TIMES["acc"].get(1), "threads": _TIMES["threads"], "workers": max(1, workers)}
