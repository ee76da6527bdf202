"""The round loop: sample -> plan -> downlink codec -> backend -> uplink codec -> aggregate -> evaluate
-> record -> checkpoint."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch
import yaml
from torch import nn

from fedslim import plugins
from fedslim.algorithms.base import Algorithm, RunContext
from fedslim.codecs import Codec, CodecContext, build_pipeline
from fedslim.config import RunConfig, comparable_config, dump_config
from fedslim.devices import DevicePopulation
from fedslim.engine.codec_stats import CodecTally, sum_codec_rows
from fedslim.engine.host import tune_malloc, use_channels_last, warm_up_optimizers
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientResult, ClientTask, ModelSpec
from fedslim.metrics import mean_metrics
from fedslim.results import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    TIMINGS_FILE,
    atomic_write_text,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
    to_json_pretty,
    write_jsonl,
)
from fedslim.rng import np_gen, torch_gen
from fedslim.tables import fmt_bytes

CHECKPOINT_VERSION = 1


# What a run writes before its first round: a folder holding only these has nothing to resume.
START_FILES = frozenset({CONFIG_FILE, "partition.txt", "partition.png"})
# Held (flock) by the run writing the folder: a second run, or a --resume, of the same folder is refused.
LOCK_FILE = ".fedslim.lock"


class RunError(RuntimeError):
    """A user-facing problem with a run (folder exists, checkpoint from another config ...)."""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("engine.device: 'cuda' requested but no CUDA device is available (use cpu or auto)")
    return name


def sample_cohort(seed: int, round_: int, num_clients: int, participation: float,
                  eligible: list[int] | None = None) -> list[int]:
    """``participation`` of the clients, or of ``eligible`` ones only (e.g. HybridCompFL's capable devices)."""
    if eligible is not None:
        pool = sorted(eligible)
        if not pool:
            return []
        m = max(1, int(round(participation * len(pool))))
        if m >= len(pool):
            return pool
        picked = np_gen(seed, "sample", round_).choice(len(pool), size=m, replace=False)
        return sorted(pool[i] for i in picked.tolist())
    m = max(1, int(round(participation * num_clients)))
    if m >= num_clients:
        return list(range(num_clients))
    return sorted(np_gen(seed, "sample", round_).choice(num_clients, size=m, replace=False).tolist())


def compressible_names(model: nn.Module, targets: str) -> frozenset[str]:
    """Names of the tensors lossy codec stages may touch; everything else travels exact."""
    names: set[str] = set()
    weighted = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in mod.named_parameters(recurse=False):
            if not p.is_floating_point():
                continue
            if targets == "all_float" or (isinstance(mod, weighted) and (
                    pname == "weight" or (targets == "weights_and_biases" and pname == "bias"))):
                names.add(prefix + pname)
    return frozenset(names)


ROUNDS_FIELD = "federation.rounds"


def _other_diffs(diffs: list[str]) -> list[str]:
    """The differences that forbid a resume: all but federation.rounds, which may extend a run."""
    return [d for d in diffs if not d.startswith(f"{ROUNDS_FIELD}:")]


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} in the checkpoint, {b!r} now"]



def _why_serial(cfg: RunConfig) -> str:
    """Why ``auto`` ran the serial backend on this CPU (see fedslim.engine.vectorized.auto_backend)."""
    from fedslim.engine.process_backend import fork_available, usable_cpus

    if (cfg.engine.threads or 1) > 1:
        return f"engine.threads={cfg.engine.threads}; process workers run one thread each"
    if usable_cpus() < 2:
        return "one usable CPU core"
    if not fork_available():
        return "no fork on this platform for process workers"
    return "CPU"

class Runner:
    def __init__(self, cfg: RunConfig, *, data_dir: str | None = None, resume: bool = False,
                 progress: bool | None = None, out: TextIO | None = None):
        self.cfg = cfg
        self.data_dir = data_dir
        self.resume = resume
        self.progress = cfg.engine.progress if progress is None else progress
        # sys.stdout as it is now, not as it was when this module was imported (a default argument
        # would keep that stream: redirect_stdout, pytest's capture or a closed stream would be missed).
        self.out = out if out is not None else sys.stdout
        self.run_dir = Path(cfg.output_dir) / cfg.name
        self._compressible: dict[ModelSpec, frozenset[str]] = {}
        self._profiles: dict[ModelSpec, dict[str, int]] = {}

    # ------------------------------------------------------------------ set-up
    def check_run_dir(self, quiet: bool = False) -> None:
        """Refuse, before anything is built or written, a run folder this run may not write: a file in
        its path, a finished or stopped run without --resume, a --resume with nothing or another config
        to resume."""
        for d in (self.run_dir, *self.run_dir.parents):
            if d.exists() and not d.is_dir():
                raise RunError(f"output_dir: {d} is a file, not a folder; choose another output_dir or name "
                               f"(the run would go to {self.run_dir})")
        ckpt = self.run_dir / CHECKPOINT_FILE
        if self.resume:
            if not ckpt.exists():
                raise RunError(f"--resume: no checkpoint in {self.run_dir} (nothing to resume)")
            cfg_file = self.run_dir / CONFIG_FILE
            try:
                old = yaml.safe_load(cfg_file.read_text())
                saved = RunConfig.model_validate(old)
            except (OSError, yaml.YAMLError, ValueError) as e:
                raise RunError(f"--resume: {cfg_file} is missing or unreadable, so the checkpoint cannot be "
                               f"matched to its config ({type(e).__name__})") from None
            diffs = _other_diffs(_diff(comparable_config(saved), comparable_config(self.cfg)))
            if diffs:
                raise RunError(f"--resume: the checkpoint in {self.run_dir} is from another config: {diffs[0]}"
                               + (f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""))
            if saved.federation.rounds != self.cfg.federation.rounds:
                self._check_rounds_change(saved.federation.rounds)
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            names = {f.name for f in self.run_dir.iterdir()}
            if all(n in START_FILES or n == LOCK_FILE or (n.startswith(".") and n.endswith(".tmp")) for n in names):
                # Stopped before its first checkpoint: nothing to resume and nothing lost by starting over.
                if not quiet:
                    self._say(f"starting over in {self.run_dir} (its run stopped before its first checkpoint)")
                return
            if not ckpt.exists():
                raise RunError(f"{self.run_dir} holds results of a run with no checkpoint to resume from; choose "
                               f"another name (--set name=...) or remove the folder")
            raise RunError(f"{self.run_dir} already holds a run; pass --resume to continue it, or choose "
                           f"another name (--set name=...)")

    def _check_rounds_change(self, saved_rounds: int) -> None:
        """A resume with another federation.rounds continues the same run to a new last round, which is
        only true when nothing already trained was planned from the old total."""
        cfg = self.cfg
        why = None
        if cfg.train.schedule.kind == "cosine":
            why = ("train.schedule.kind is cosine, whose learning rate in every round depends on "
                   "federation.rounds, so the rounds already trained would not be those of the new run")
        else:
            fixed = getattr(plugins.ALGORITHMS.get(cfg.algorithm.name), "rounds_fixed", None)
            if fixed:
                why = f"algorithm {cfg.algorithm.name} cannot change it: {fixed}"
        if why:
            raise RunError(f"--resume: {ROUNDS_FIELD}: the run in {self.run_dir} was planned for {saved_rounds} "
                           f"rounds and cannot continue to {cfg.federation.rounds}: {why}; start a new run "
                           f"(--set name=...) for {cfg.federation.rounds} rounds")

    def _build(self) -> None:
        from fedslim.data.datasets import load_dataset
        from fedslim.data.partition import make_partition, split_local_test

        cfg = self.cfg
        if cfg.engine.threads:
            from fedslim.engine.process_backend import usable_cpus

            cores = usable_cpus()
            if cfg.engine.threads > cores:
                warnings.warn(f"engine.threads={cfg.engine.threads} is more than the {cores} usable CPU cores: "
                              f"the extra threads only wait for a core and slow each step", stacklevel=2)
            torch.set_num_threads(cfg.engine.threads)
        # Before any worker is forked: they inherit both.
        if cfg.engine.tune_malloc:
            tune_malloc()
        warm_up_optimizers()
        self.device = resolve_device(cfg.engine.device)
        root = cfg.data.root or self.data_dir or os.environ.get("FEDSLIM_DATA")
        bundle = load_dataset(cfg.data.dataset, root, train_subset=cfg.data.train_subset,
                              test_subset=cfg.data.test_subset, options=cfg.data.options)
        self._check_model_fits(bundle.num_classes, tuple(bundle.input_shape))
        labels = bundle.train.y.numpy()
        parts = make_partition(labels, cfg.data.num_clients, cfg.data.partition, cfg.seed)
        test_parts = None
        if cfg.data.local_test_fraction > 0:
            rng = np_gen(cfg.seed, "local_test")
            split = [split_local_test(p, cfg.data.local_test_fraction, rng) for p in parts]
            parts = [s[0] for s in split]
            test_parts = [torch.as_tensor(s[1], dtype=torch.long) for s in split]
        self.parts = parts
        self.channels_last = use_channels_last(cfg.engine.memory_format, self.device, tuple(bundle.input_shape))
        store = ClientStore(bundle, [torch.as_tensor(p, dtype=torch.long) for p in parts], test_parts,
                            device=self.device, channels_last=self.channels_last)
        self.devices = DevicePopulation(cfg.devices, cfg.data.num_clients, cfg.seed)
        backend_cls = plugins.BACKENDS.get(cfg.engine.backend, field="engine.backend")
        self.backend = backend_cls(store, device=self.device, cfg=cfg)
        self.ctx = RunContext(cfg, bundle, store, self.devices, self.backend, self.run_dir, self.device)
        algo_cls = plugins.ALGORITHMS.get(cfg.algorithm.name, field="algorithm.name")
        params = algo_cls.Params.model_validate(cfg.algorithm.params)
        self.algo: Algorithm = algo_cls(self.ctx, params)
        self.codec_down: Codec = build_pipeline([s.model_dump() for s in cfg.codec.down], "codec.down",
                                                  downlink=True)
        # An algorithm whose method is an uplink compressor (QuantFL) supplies the pipeline itself.
        own_up = getattr(self.algo, "uplink_codec", None)
        up = own_up() if callable(own_up) else None
        self.codec_up: Codec = up or build_pipeline([s.model_dump() for s in cfg.codec.up], "codec.up")
        self.tally = {"up": CodecTally(), "down": CodecTally()}

    def _check_model_fits(self, num_classes: int, input_shape: tuple[int, ...]) -> None:
        """Refuse a model the dataset's samples are too small for (VGG-16 on MNIST), naming model.name and
        the models that do fit, before a worker starts or anything is written."""
        from fedslim.models.layers import InputTooSmallError

        m = self.cfg.model
        try:
            _build_on_meta(m.name, num_classes, input_shape, m.width, m.options)
        except InputTooSmallError as e:
            fit = []
            for name in plugins.MODELS.names():
                try:
                    _build_on_meta(name, num_classes, input_shape, m.width, {})
                except Exception:  # noqa: BLE001 - too small, or not buildable this way: not offered
                    continue
                fit.append(name)
            raise RunError(f"model.name: {m.name!r} needs inputs of {e.need}, but data.dataset "
                           f"{self.cfg.data.dataset!r} has samples of shape {input_shape}; models that fit: "
                           f"{', '.join(fit) or 'none registered'}") from None
        except Exception:  # noqa: BLE001 - any other problem is reported where setup builds the model
            return

    def _write_partition_report(self) -> None:
        from fedslim.data.report import format_label_report, label_counts, plot_label_counts

        b = self.ctx.bundle
        counts = label_counts(b.train.y.numpy(), self.parts, b.num_classes)
        atomic_write_text(self.run_dir / "partition.txt", format_label_report(counts, b.class_names))
        plot_label_counts(counts, self.run_dir / "partition.png", b.class_names)

    def _remove_stale_temporaries(self) -> None:
        """A run killed while writing a file atomically leaves its temporary copy (``.checkpoint.pt.XXXX.tmp``:
        as large as the checkpoint); the run that takes the folder over removes them."""
        ours = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, CHECKPOINT_FILE, TIMINGS_FILE, *START_FILES)
        for f in self.run_dir.iterdir():
            if f.name.endswith(".tmp") and any(f.name.startswith(f".{n}.") for n in ours) and f.is_file():
                f.unlink(missing_ok=True)

    def _check_metrics_cover(self, rows: list[dict[str, Any]], ck: dict[str, Any], last: int) -> None:
        """A resumed run carries on from the rows it already wrote: each round the checkpoint has passed
        that was evaluated must be there, or the resumed metrics.jsonl and summary.json would go without
        them (and without their bytes and simulated time) while looking complete. ``last``: the last round
        of the run that wrote the checkpoint (a run continued to another total evaluated its old last)."""
        ck_round = ck["round"]
        want = ck.get("evaluated")  # recorded since runs could be continued; before, implied by the config
        if not isinstance(want, list):
            want = [r for r in range(1, ck_round + 1) if r % self.cfg.eval.every == 0 or r == last]
        have = [r.get("round") for r in rows]
        if have != want:
            path = self.run_dir / METRICS_FILE
            what = "is missing" if not path.exists() else f"holds rounds {_rounds(have)}"
            raise RunError(f"--resume: {path} {what}, but the checkpoint is at round {ck_round} and needs the "
                           f"evaluated rounds {_rounds(want)}; resuming would lose them (was the file "
                           f"truncated or edited?). Restore the file, or start the run over under another name")

    # ------------------------------------------------------------------ helpers
    def compressible(self, spec: ModelSpec) -> frozenset[str]:
        if spec not in self._compressible:
            self._compressible[spec] = compressible_names(spec.build(), self.cfg.codec.targets)
        return self._compressible[spec]

    def profile(self, spec: ModelSpec) -> dict[str, int]:
        if spec not in self._profiles:
            from fedslim.models.profile import profile_spec

            self._profiles[spec] = profile_spec(spec.name, spec.num_classes, spec.input_shape, spec.width,
                                                **dict(spec.options))
        return self._profiles[spec]

    def _downlink(self, round_: int, tasks: list[ClientTask]) -> dict[int, int]:
        """Encode each task's payload, count the bytes, hand the client the decoded weights.

        Identical payloads (same state object, spec and codec) are encoded once per round: the server
        produces those bytes once and sends them to every client in the group.
        """
        sent: dict[int, int] = {}
        cache: dict[tuple[int, ModelSpec, int], tuple[int, dict[str, torch.Tensor], dict[str, Any]]] = {}
        for t in tasks:
            codec = t.down_codec or self.codec_down
            key = (id(t.state), t.spec, id(codec))
            if key not in cache:
                ctx = CodecContext("down", -1, round_, self.compressible(t.spec),
                                   torch_gen(self.cfg.seed, "codec_down", round_))
                payload = codec.encode(t.state, ctx)
                cache[key] = (len(payload), codec.decode(payload, ctx), dict(codec.last_stats))
            nbytes, decoded, stats = cache[key]
            t.state = decoded
            sent[t.client] = sent.get(t.client, 0) + nbytes
            self.tally["down"].add(stats)
        return sent

    def _uplink(self, round_: int, tasks: list[ClientTask], results: list[ClientResult]) -> dict[int, int]:
        sent: dict[int, int] = {}
        by_client = {t.client: t for t in tasks}
        for r in results:
            if not r.delta:
                continue
            ctx = CodecContext("up", r.client, round_, self.compressible(by_client[r.client].spec),
                               torch_gen(self.cfg.seed, "codec_up", round_, r.client))
            payload = self.codec_up.encode(r.delta, ctx)
            self.tally["up"].add(self.codec_up.last_stats)
            r.delta = self.codec_up.decode(payload, ctx)
            sent[r.client] = sent.get(r.client, 0) + len(payload)
        return sent

    def _evaluate(self, round_: int) -> dict[str, Any]:
        ev: dict[str, Any] = {}
        for label, (spec, state) in self.algo.eval_targets(round_).items():
            ev[label] = self.ctx.evaluate(spec, state)
        out: dict[str, Any] = {"eval": ev}
        if self.cfg.eval.local:
            clients = list(range(self.ctx.num_clients))
            results = self.backend.run(self.algo.local_eval_tasks(round_, clients))
            per = {r.client: r.extras["metrics"] for r in results}
            local: dict[str, Any] = {"all": mean_metrics(list(per.values()))}
            groups = self._local_groups(round_, clients)
            for name, group in groups.items():
                members = [per[c] for c in group if c in per]
                if members and len(groups) > 1:
                    local[name] = mean_metrics(members)
            out["local"] = local
        return out

    def _local_groups(self, round_: int, clients: list[int]) -> dict[str, list[int]]:
        """Clients whose local metrics are also reported together: the algorithm's groups where it has
        its own (``local_groups``: HeteroFL's levels when they are not the device tiers), else the tiers."""
        hook = getattr(self.algo, "local_groups", None)
        groups = hook(round_, clients) if callable(hook) else None
        if groups is not None:
            return groups
        tiers = self.devices.assignment(round_)
        return {t.name: [c for c in clients if int(tiers[c]) == ti] for ti, t in enumerate(self.devices.tiers)}

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        self._lock_fd: int | None = None
        try:
            return self._run()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the lock
                self._lock_fd = None

    def _lock(self) -> None:
        """Hold the run folder for this run, then check it again: another run may have taken it, or
        moved it on, while this one was setting up."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform: unguarded, as before
            return
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunError(f"{self.run_dir} is in use by another fedslim run (it holds {LOCK_FILE}); wait for it "
                           f"to end, or choose another name (--set name=...)") from None
        self._lock_fd = fd
        self.check_run_dir(quiet=True)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.check_run_dir()
        self._build()
        try:
            self.algo.setup()  # before the folder is made: a model that cannot be built leaves none behind
        except BaseException:
            self.backend.close()
            raise
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.backend.close()
            raise RunError(f"output_dir: cannot create the run folder {self.run_dir} ({e.strerror or e}); choose "
                           f"another output_dir") from None
        try:
            self._lock()
        except BaseException:
            self.backend.close()
            raise
        self._remove_stale_temporaries()
        start_round, rows, cum = 1, [], {"up": 0, "down": 0, "sim_time_s": 0.0}
        timings: list[dict[str, Any]] = []
        # Rounds since the last metrics row: their bytes and simulated time go into the next row.
        pending_comm: list[dict[str, Any]] = []
        if self.resume:
            try:
                ck = load_checkpoint(self.run_dir / CHECKPOINT_FILE)
            except ValueError as e:
                self.backend.close()
                raise RunError(f"--resume: {e}; the run cannot continue from it (restore the file, or start "
                               f"over under another name)") from None
            if ck.get("version") != CHECKPOINT_VERSION:
                self.backend.close()
                raise RunError(f"{self.run_dir / CHECKPOINT_FILE}: checkpoint version {ck.get('version')} "
                               f"is not supported (expected {CHECKPOINT_VERSION})")
            saved_cfg = comparable_config(ck["config"]) if isinstance(ck.get("config"), dict) else {}
            diffs = _diff(saved_cfg, comparable_config(cfg))
            others = _other_diffs(diffs)
            if others or (diffs and not isinstance(saved_cfg.get("federation", {}).get("rounds"), int)):
                self.backend.close()
                raise RunError(f"--resume: {self.run_dir / CHECKPOINT_FILE} was written by another config"
                               + (f": {(others or diffs)[0]}" if others or diffs else "")
                               + (f" (+{len(diffs) - 1} more)" if len(diffs) > 1 else ""))
            extend_from = saved_cfg["federation"]["rounds"] if diffs else None
            if extend_from is not None:
                try:
                    self._check_rounds_change(extend_from)
                except RunError:
                    self.backend.close()
                    raise
                if ck["round"] >= cfg.federation.rounds:
                    self.backend.close()
                    raise RunError(f"--resume: {ROUNDS_FIELD}: the run in {self.run_dir} has already trained "
                                   f"{ck['round']} rounds; to continue it, give more than {ck['round']} (got "
                                   f"{cfg.federation.rounds})")
            self.algo.load_state_dict(ck["algorithm"])
            self.codec_up.load_state_dict(ck["codec_up"])
            self.codec_down.load_state_dict(ck["codec_down"])
            start_round, cum = ck["round"] + 1, ck["cumulative"]
            # A checkpoint between two evaluated rounds carries what the next row will sum.
            pending_comm = list(ck.get("pending_comm") or [])
            if ck.get("codec_tally") is not None:
                self.tally = ck["codec_tally"]
            rows = [r for r in read_jsonl(self.run_dir / METRICS_FILE) if r.get("round", 0) <= ck["round"]]
            self._check_metrics_cover(rows, ck, extend_from or cfg.federation.rounds)
            timings = [r for r in read_jsonl(self.run_dir / TIMINGS_FILE) if r["round"] <= ck["round"]]
            if start_round > cfg.federation.rounds and (self.run_dir / SUMMARY_FILE).exists():
                # Finished: running finalize again (HybridCompFL deploys to every device) would only
                # redo work and rewrite the results of a complete run.
                self.backend.close()
                self._say(f"{self.run_dir} already finished all {cfg.federation.rounds} rounds; nothing to "
                          f"resume (its results are in {SUMMARY_FILE} and {METRICS_FILE})")
                return json.loads((self.run_dir / SUMMARY_FILE).read_text())
            if extend_from is not None:
                kept = self.run_dir / f"summary_round_{ck['round']}.json"
                if (self.run_dir / SUMMARY_FILE).exists():
                    # The finished run's results stay beside the continued run's, under its last round.
                    os.replace(self.run_dir / SUMMARY_FILE, kept)
                atomic_write_text(self.run_dir / CONFIG_FILE, dump_config(cfg))
                self._say(f"resuming {self.run_dir} at round {start_round}: {ROUNDS_FIELD} {extend_from} -> "
                          f"{cfg.federation.rounds}" + (f" (the summary of its first {ck['round']} rounds is "
                                                        f"kept as {kept.name})" if kept.exists() else ""))
            elif start_round > cfg.federation.rounds:
                self._say(f"resuming {self.run_dir}: all {cfg.federation.rounds} rounds are done, finishing the run")
            else:
                self._say(f"resuming {self.run_dir} at round {start_round}")
        else:
            atomic_write_text(self.run_dir / CONFIG_FILE, dump_config(cfg))
            self._write_partition_report()
        resolved = type(self.backend).__name__.removesuffix("Backend").lower()
        workers = getattr(self.backend, "max_workers", "?")
        why = {"vectorized": "CUDA", "process": f"{workers} worker processes, one per usable CPU core",
               "serial": _why_serial(cfg)}.get(resolved, "")
        picked = f" (auto: {why})" if cfg.engine.backend == "auto" and why else ""
        layout = ", channels-last" if self.channels_last else ""
        self._say(f"backend {resolved} on {self.device}{layout}{picked}")
        for note in self.ctx.notes:
            self._say(f"note: {note}")

        notes_before = len(self.ctx.notes)
        bar = self._bar(start_round)
        try:
            for rnd in range(start_round, cfg.federation.rounds + 1):
                t0 = time.perf_counter()
                eligible = getattr(self.algo, "eligible_clients", None)
                # An algorithm may sample another share in some rounds (AutoFLIP's explorers).
                share = getattr(self.algo, "participation", None)
                rate = share(rnd) if callable(share) else None
                cohort = sample_cohort(cfg.seed, rnd, self.ctx.num_clients,
                                       cfg.federation.participation if rate is None else rate,
                                       eligible(rnd) if callable(eligible) else None)
                tasks = self.algo.plan(rnd, cohort)
                down = self._downlink(rnd, tasks)
                t1 = time.perf_counter()
                results = self.backend.run(tasks)
                t2 = time.perf_counter()
                up = self._uplink(rnd, tasks, results)
                extra = self.algo.aggregate(rnd, tasks, results) or {}
                t3 = time.perf_counter()
                sim = self._sim_time(rnd, tasks, results, down, up)
                cum["up"] += sum(up.values())
                cum["down"] += sum(down.values())
                cum["sim_time_s"] += sim
                n = sum(r.num_samples for r in results)
                loss = sum(r.loss * r.num_samples for r in results) / max(n, 1)
                # JSON object keys are strings: convert now so a resumed run re-serialises identically
                # What aggregate returned, per round: with eval.every > 1 the row's own extras are only its
                # round's, and an unevaluated round's (AutoFLIP's exploration, HeteroFL's levels) live here.
                pending_comm.append({"round": rnd, "bytes_up": {str(k): v for k, v in up.items()},
                                     "bytes_down": {str(k): v for k, v in down.items()}, "sim_time_s": sim,
                                     **({"algorithm": extra} if extra else {})})
                last = rnd == cfg.federation.rounds
                if rnd % cfg.eval.every == 0 or last:
                    row: dict[str, Any] = {
                        "round": rnd, "lr": self.ctx.local_train(rnd).lr, "clients": len(cohort),
                        "train_loss": loss, "bytes_up": sum(sum(c["bytes_up"].values()) for c in pending_comm),
                        "bytes_down": sum(sum(c["bytes_down"].values()) for c in pending_comm),
                        "cum_bytes_up": cum["up"], "cum_bytes_down": cum["down"],
                        "sim_time_s": cum["sim_time_s"], "comm": pending_comm,
                        "codec_up": self.tally["up"].row(), "codec_down": self.tally["down"].row(), **extra,
                    }
                    self.tally = {"up": CodecTally(), "down": CodecTally()}
                    row.update(self._evaluate(rnd))
                    rows.append(row)
                    pending_comm = []
                    write_jsonl(self.run_dir / METRICS_FILE, rows)
                    self._postfix(bar, row)
                t4 = time.perf_counter()
                phases, self.algo.phase_seconds = self.algo.phase_seconds, {}
                # The backend too: a run resumed on another one (engine settings may change) says which ran.
                timings.append({"round": rnd, "backend": resolved, "plan_down_s": t1 - t0, "clients_s": t2 - t1,
                                "up_aggregate_s": t3 - t2 - sum(phases.values()), "eval_s": t4 - t3, **phases})
                # Between two evaluated rounds too (eval.every > 1): the rounds not yet in a metrics row
                # travel in the checkpoint, so that checkpoint_every holds whatever eval.every is.
                if rnd % cfg.engine.checkpoint_every == 0 or last:
                    write_jsonl(self.run_dir / TIMINGS_FILE, timings)
                    save_checkpoint(self.run_dir / CHECKPOINT_FILE, {
                        "version": CHECKPOINT_VERSION, "round": rnd, "config": comparable_config(cfg),
                        "algorithm": self.algo.state_dict(), "codec_up": self.codec_up.state_dict(),
                        "codec_down": self.codec_down.state_dict(), "cumulative": dict(cum),
                        "pending_comm": list(pending_comm), "codec_tally": self.tally,
                        "evaluated": [r["round"] for r in rows]})
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
                bar = None
            # Before the backend closes: finalize may still run client tasks (HybridCompFL's deployment).
            final = self.algo.finalize() or {}
        finally:
            if bar is not None:
                bar.close()
            self.backend.close()
        for note in self.ctx.notes[notes_before:]:
            self._say(f"note: {note}")
        summary = self._summary(rows, cum, final)
        atomic_write_text(self.run_dir / SUMMARY_FILE, to_json_pretty(summary) + "\n")
        self._print_table(summary)
        return summary

    def _sim_time(self, rnd: int, tasks: list[ClientTask], results: list[ClientResult],
                  down: dict[int, int], up: dict[int, int]) -> float:
        """Simulated round time: the slowest client (download + 3x forward MACs per sample + upload)."""
        spec_of = {t.client: t.spec for t in tasks}
        worst = 0.0
        for r in results:
            macs = 3 * self.profile(spec_of[r.client])["macs"] * r.extras.get("samples_processed", 0)
            tier = self.devices.tier(rnd, r.client)
            worst = max(worst, self.devices.client_time(tier, down.get(r.client, 0), up.get(r.client, 0), macs))
        return worst

    def _summary(self, rows: list[dict[str, Any]], cum: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
        last = rows[-1] if rows else {}
        models = {label: {**self.profile(spec), "width": spec.width, "model": spec.name}
                  for label, (spec, _) in self.algo.eval_targets(self.cfg.federation.rounds).items()}
        best = {label: max(r["eval"][label]["acc"] for r in rows if label in r.get("eval", {}))
                for label in last.get("eval", {})}
        return {
            "name": self.cfg.name, "seed": self.cfg.seed, "algorithm": self.cfg.algorithm.name,
            "dataset": self.cfg.data.dataset, "model": self.cfg.model.name, "rounds": self.cfg.federation.rounds,
            "clients": self.cfg.data.num_clients, "final": last.get("eval", {}), "best_acc": best,
            "local": last.get("local"), "bytes_up": cum["up"], "bytes_down": cum["down"],
            "sim_time_s": cum["sim_time_s"], "models": models, "notes": self.ctx.notes,
            "codec_up": sum_codec_rows([r.get("codec_up") for r in rows]),
            "codec_down": sum_codec_rows([r.get("codec_down") for r in rows]),
            **self.algo.summary(), **final,
        }

    # ------------------------------------------------------------------ output
    def _say(self, msg: str) -> None:
        print(msg, file=self.out)

    def _bar(self, start: int) -> Any:
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.federation.rounds, initial=start - 1, desc=self.cfg.name, unit="round",
                    file=self.out, dynamic_ncols=True, leave=True)

    @staticmethod
    def _postfix(bar: Any, row: dict[str, Any]) -> None:
        if bar is None:
            return
        accs = {k: f"{v['acc'] * 100:.2f}" for k, v in row["eval"].items() if "acc" in v}
        bar.set_postfix(acc=",".join(f"{k}={v}" for k, v in accs.items()) if len(accs) > 1
                        else next(iter(accs.values()), "-"), up=fmt_bytes(row["cum_bytes_up"]))

    def _print_table(self, s: dict[str, Any]) -> None:
        rounds = f"{s['rounds']} round{'s' if s['rounds'] != 1 else ''}"
        lines = [f"\n{s['name']}: {s['algorithm']} / {s['model']} / {s['dataset']}, {rounds}, "
                 f"{s['clients']} clients -> {self.run_dir}"]
        # top-k is capped at the class count (top3 on 3 classes): the header names the k measured.
        top_key = next((k for m in s["final"].values() for k in m if k.startswith("top")), "top5")
        header = (f"{'model':<10} {'acc':>7} {top_key:>7} {'f1_macro':>8} {'f1_w':>7} {'loss':>7} "
                  f"{'params':>10} {'MACs':>10}")
        lines += [header, "-" * len(header)]
        for label, m in s["final"].items():
            prof = s["models"].get(label, {})
            top = m.get(top_key, float("nan"))
            lines.append(f"{label:<10} {m['acc'] * 100:7.2f} {top * 100:7.2f} {m['f1_macro'] * 100:8.2f} "
                         f"{m['f1_weighted'] * 100:7.2f} {m['loss']:7.4f} {prof.get('params', 0):>10,} "
                         f"{prof.get('macs', 0):>10,}")
        if s.get("local"):
            for tier, m in s["local"].items():
                # Every client's local split can be empty (one-sample clients): {"n": 0}, no accuracy.
                acc = f"{m['acc'] * 100:7.2f}" if "acc" in m else f"{'-':>7}"
                lines.append(f"local/{tier:<4} {acc}  (clients' own test splits, n={m.get('n', 0)})")
        lines.append(f"bytes up {fmt_bytes(s['bytes_up'])}, down {fmt_bytes(s['bytes_down'])}, "
                     f"simulated time {s['sim_time_s']:.1f} s")
        for side in ("up", "down"):
            c = s.get(f"codec_{side}")
            if c and c["codec"] != "exact":
                sparsity = "" if c["measured_sparsity"] is None else (
                    f", measured sparsity {c['measured_sparsity'] * 100:.2f} %")
                lines.append(f"{side}link codec {c['codec']}: {c['payloads']} payloads, {fmt_bytes(c['bytes'])} "
                             f"vs {fmt_bytes(c['float32_bytes'])} float32 ({c['ratio_vs_float32']:.2f}x smaller)"
                             f"{sparsity}, rounding zeros {c['rounding_zeros']:,}")
        describe = getattr(self.algo, "describe_summary", None)
        if callable(describe):
            lines += describe(s)
        self._say("\n".join(lines))


def _build_on_meta(name: str, num_classes: int, input_shape: tuple[int, ...], width: float,
                   options: dict[str, Any]) -> None:
    """Build a model on the meta device: its checks run, no memory is filled and no RNG is drawn."""
    from fedslim.models import build_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        build_model(name, num_classes=num_classes, input_shape=input_shape, width=width, **options)


def _rounds(rs: list[Any]) -> str:
    """1, 2, 3, 5 -> '1-3, 5' (a long run's rounds in a few characters)."""
    if not rs:
        return "none"
    out: list[str] = []
    i = 0
    while i < len(rs):
        j = i
        while (j + 1 < len(rs) and isinstance(rs[j], int) and isinstance(rs[j + 1], int)
               and rs[j + 1] == rs[j] + 1):
            j += 1
        out.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ", ".join(out)


def run_config(cfg: RunConfig, **kw: Any) -> dict[str, Any]:
    return Runner(cfg, **kw).run()

