"""Run configuration: YAML + ``--set`` overrides, validated by pydantic.

Every error becomes a :class:`ConfigError` with one line naming the field, what is allowed and, for an
unknown key, the closest valid name. The CLI prints it and exits 2.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PartitionConfig(Strict):
    kind: Literal["iid", "dirichlet", "pathological", "quantity"] = "iid"
    alpha: float = Field(0.5, gt=0, allow_inf_nan=False, description="Dirichlet concentration (dirichlet, quantity)")
    classes_per_client: int = Field(2, ge=1, description="labels per client (pathological)")
    min_size: int = Field(10, ge=0, description="minimum samples per client (dirichlet, quantity)")
    max_tries: int = Field(100, ge=1, description="Dirichlet redraws before falling back to top-up")


class DataConfig(Strict):
    dataset: str = "digits"
    root: str | None = Field(None, description="data folder; default: --data-dir, $FEDSLIM_DATA, ./data")
    num_clients: int = Field(10, ge=1)
    partition: PartitionConfig = PartitionConfig()
    local_test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="per-client held-out share")
    train_subset: int | None = Field(None, ge=1, description="use only the first N training samples")
    test_subset: int | None = Field(None, ge=1, description="use only the first N test samples")
    options: dict[str, Any] = Field(default_factory=dict, description="dataset-specific options")


class ModelConfig(Strict):
    name: str = "lenet5"
    width: float = Field(1.0, gt=0, le=16)
    options: dict[str, Any] = Field(default_factory=dict, description="model-specific options")


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


class ScheduleConfig(Strict):
    """Per-round learning-rate schedule applied to the client lr."""

    kind: Literal["constant", "exponential", "step", "multistep", "cosine"] = "constant"
    gamma: float = Field(1.0, gt=0, le=1, description="decay factor (exponential, step, multistep)")
    step_size: int = Field(1, ge=1, description="rounds between decays (step)")
    milestones: list[int] = Field(default_factory=list, description="rounds at which to decay (multistep)")
    min_lr: float = Field(0.0, ge=0, description="floor for cosine")


class TrainConfig(Strict):
    """Local training on each client."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    max_steps: int | None = Field(None, ge=1, description="cap on local steps per round")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    grad_clip: float | None = Field(None, gt=0, description="max global grad norm")
    augment: Literal["none", "flip", "crop_flip"] = Field("none", description="batched, seeded augmentation")


class ServerOptimizerConfig(Strict):
    name: Literal["none", "sgd", "adam"] = "none"
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(1e-3, gt=0)


class FederationConfig(Strict):
    rounds: int = Field(10, ge=1)
    participation: float = Field(1.0, gt=0, le=1, description="share of clients sampled each round")
    weighted: bool = Field(True, description="weight client updates by their sample counts")
    server_optimizer: ServerOptimizerConfig = ServerOptimizerConfig()


class AlgorithmConfig(Strict):
    name: str = "fedavg"
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the algorithm itself")


class CodecStage(BaseModel):
    """One codec stage; its own fields are validated by the codec registry."""

    model_config = ConfigDict(extra="allow")
    name: str

    @model_validator(mode="before")
    @classmethod
    def _needs_name(cls, v: Any) -> Any:
        # Extra keys are the stage's own, so a misspelt 'name' would only be reported as missing.
        if isinstance(v, dict) and "name" not in v:
            from fedslim import plugins

            close = difflib.get_close_matches("name", [str(k) for k in v], n=1)
            hint = f"'{close[0]}' is not a key (did you mean 'name'?); " if close else ""
            raise ValueError(f"{hint}every stage needs a name, one of {', '.join(plugins.CODECS.names())}")
        return v


class CodecConfig(Strict):
    down: list[CodecStage] = Field(default_factory=list, description="downlink pipeline (server->client)")
    up: list[CodecStage] = Field(default_factory=list, description="uplink pipeline (client->server)")
    targets: Literal["weights", "weights_and_biases", "all_float"] = "weights"


class DeviceTier(Strict):
    name: str
    share: float = Field(1.0, gt=0, description="relative share of the population")
    width: float = Field(1.0, gt=0, le=1, description=(
        "width rate of this tier's sub-model (heterofl, fedrolex, fed_dropout without model_split); "
        "algorithms that give every device one model refuse a width other than 1"))
    capable: bool = Field(True, description="hybridcomp: only capable devices train, the others get a compressed "
                                            "model; algorithms that train every device refuse false")
    model_bytes: int | None = Field(None, ge=1, description=(
        "largest model this tier can hold, in bytes: hybridcomp serves constrained tiers within it; a run whose "
        "tier cannot hold the (sub-)model it would train is refused"))
    memory_mb: float | None = Field(None, gt=0, description=(
        "memory in MB (10^6 B): the model plus batch-1 activations must fit (a lower bound of training); "
        "hybridcomp with budget: memory serves constrained tiers within it"))
    macs_per_s: float = Field(1e9, gt=0, description="compute speed for simulated time (3x forward MACs per "
                                                     "sample trained)")
    up_mbps: float = Field(10.0, gt=0, description="uplink Mbit/s for simulated time (encoded bytes)")
    down_mbps: float = Field(50.0, gt=0, description="downlink Mbit/s for simulated time (encoded bytes)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # Per-tier local metrics are keyed by tier name beside 'all' (the mean over every client): a tier
        # called 'all' replaced that mean with its own. An empty name would be an empty column.
        if not v.strip():
            raise ValueError("a tier needs a non-empty name")
        if v == "all":
            raise ValueError("'all' is reserved (local metrics report the mean over every client as 'all'); "
                             "choose another tier name")
        return v


class DevicesConfig(Strict):
    tiers: list[DeviceTier] = Field(default_factory=lambda: [DeviceTier(name="a")], min_length=1)
    assignment: Literal["fixed", "dynamic", "random"] = Field(
        "fixed", description="fixed: by client index; random: seeded once; dynamic: re-drawn each round"
    )

    @field_validator("tiers")
    @classmethod
    def _unique_names(cls, v: list[DeviceTier]) -> list[DeviceTier]:
        # Tiers are looked up, reported and given HeteroFL levels by name: a second one would be lost.
        seen: dict[str, int] = {}
        for i, t in enumerate(v):
            if t.name in seen:
                raise ValueError(f"devices.tiers.{i}.name: tier name {t.name!r} is already used by "
                                 f"devices.tiers.{seen[t.name]}; tier names must be unique")
            seen[t.name] = i
        return v


class EvalConfig(Strict):
    every: int = Field(1, ge=1, description="evaluate every k rounds (and always at the last)")
    batch_size: int = Field(1000, ge=1)
    local: bool = Field(False, description="also evaluate on each client's local test split")
    topk: int = Field(5, ge=1)


# More torch threads than any machine here has cores only slows a run down; far more fails in the OS.
MAX_THREADS = 1024


class EngineConfig(Strict):
    backend: str = Field("auto", description="auto (vectorized on CUDA, process pool on a multi-core CPU, else serial) "
                         "| serial | process | vectorized | ray")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="auto: cuda when available, else cpu")
    # strict: YAML's `true` would otherwise pass as 1 thread.
    threads: int | None = Field(None, ge=1, le=MAX_THREADS, strict=True, description="torch intra-op threads")
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto", description="layout of image models and batches; auto: channels_last on CPU, contiguous on CUDA")
    tune_malloc: bool = Field(True, description="keep freed heap memory in the process (glibc) instead of "
                              "returning it each step; fewer page faults, up to 128 MiB more memory per process")
    dispatch: Literal["longest_first", "in_order"] = Field(
        "longest_first", description="order in which process and ray workers take a cohort's tasks: "
        "longest_first (estimated from steps and model MACs) ends rounds sooner when clients differ in size "
        "or model; results are the same either way")
    ray_address: str | None = None
    ray_workers: int | None = Field(None, ge=1)
    max_group: int | None = Field(None, ge=1, description=(
        "vectorized: at most this many clients trained as one batched step; default: as many as an estimate "
        "says fit in 80% of the device's free memory (a group that still runs out of it is retried in halves)"))
    checkpoint_every: int = Field(1, ge=1, description="write checkpoint.pt every N rounds (and at the last); "
                                  "fedslim run --resume continues from it")
    progress: bool = True

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_is_a_name(cls, v: Any) -> Any:
        if not isinstance(v, str) or not v.strip():
            from fedslim import plugins

            raise ValueError(f"must be one of: {', '.join(plugins.BACKENDS.names())}")
        return v

    @model_validator(mode="after")
    def _settings_need_their_backend(self) -> EngineConfig:
        # A setting for another backend would otherwise be ignored without a word. (auto may pick
        # vectorized, on CUDA, so max_group stays allowed with it.)
        users = {"ray_address": ("ray",), "ray_workers": ("ray",), "max_group": ("vectorized", "auto")}
        for name, backends in users.items():
            if getattr(self, name) is not None and self.backend not in backends:
                raise ValueError(f"engine.{name} is used only by engine.backend: {' or '.join(backends)} "
                                 f"(engine.backend is {self.backend!r}); set engine.backend={backends[0]} or "
                                 f"leave engine.{name} unset")
        return self


class RunConfig(Strict):
    name: str = "run"
    seed: int = Field(0, ge=0)
    output_dir: str = "runs"
    # Imported before the rest is validated, so the names they register are valid below.
    plugins: list[str] = Field(default_factory=list, description="modules or Python files (relative to the "
                                                                  "config file's folder) that register methods, "
                                                                  "models, datasets or codecs")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    codec: CodecConfig = CodecConfig()
    devices: DevicesConfig = DevicesConfig()
    eval: EvalConfig = EvalConfig()
    engine: EngineConfig = EngineConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\0") or v in {".", ".."}:
            raise ValueError("must be a plain folder name (no '/', not '.' or '..')")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        if self.data.partition.kind == "pathological" and self.data.partition.classes_per_client < 1:
            raise ValueError("data.partition.classes_per_client must be >= 1")
        if self.eval.local and self.data.local_test_fraction == 0:
            raise ValueError("eval.local: true needs a local test split on every client, but "
                             "data.local_test_fraction is 0; set data.local_test_fraction (e.g. 0.2, allowed: "
                             "0 <= f < 1) or eval.local=false")
        return self


# ---------------------------------------------------------------------------------------------
# loading, overrides, errors


def _model_fields(model: type[BaseModel], path: list[str | int]) -> list[str]:
    """Valid keys at ``path`` inside ``model`` (for 'did you mean')."""
    cur: Any = model
    for part in path:
        if isinstance(part, int):  # an index into a list of models (devices.tiers.0): same model
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        f = cur.model_fields.get(part)
        if f is None:
            return []
        ann = f.annotation
        cur = ann if isinstance(ann, type) else getattr(ann, "__args__", [None])[0]
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def comparable_config(cfg: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """The part of a config that decides the numbers. Also takes a saved one (a dict: a checkpoint's, or
    a run folder's config.yaml), which older versions saved with more fields in it."""
    d = copy.deepcopy(cfg) if isinstance(cfg, dict) else cfg.model_dump(mode="json")
    d.pop("engine", None)  # where and how fast it runs does not change the numbers
    # Nor where its files live: a run folder moved or renamed (output_dir, name), or a dataset moved
    # (data.root, like --data-dir and $FEDSLIM_DATA, which were never compared), resumes as it was.
    d.pop("output_dir", None)
    d.pop("name", None)
    if isinstance(d.get("data"), dict):
        d["data"].pop("root", None)
    if not d.get("plugins"):
        d.pop("plugins", None)  # as a checkpoint written before configs had plugins has it
    return d


def format_validation_error(err: ValidationError, root: type[BaseModel] = RunConfig, prefix: str = "") -> str:
    errors = err.errors()
    # An unknown key first: it is most likely the misspelling of a required key also reported missing.
    e = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    field = prefix + ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        # A model may say why a key a related model takes is not one of its own.
        why = getattr(root, "key_hints", {}).get(loc[-1]) if len(loc) == 1 else None
        if why:
            return f"{field}: {why}"
        valid = _model_fields(root, list(loc[:-1]))
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
        allowed = f"; valid keys here: {', '.join(valid)}" if valid else ""
        return f"{field}: unknown key{hint}{allowed}"
    msg = e["msg"]
    if e["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
        # A model validator's message that names its own field, or the root validator's, which names
        # the fields it checks.
        if msg.startswith(f"{field}.") or not field:
            return msg
    if e["type"] == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    got = e.get("input")
    shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
    more = f" [+{len(errors) - 1} more]" if len(errors) > 1 else ""
    return f"{field or '<root>'}: {msg}{shown}{more}"


def parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars/lists: 0.5, true, [1, 2], null, 'text'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value")
    key, value = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    cur: Any = raw
    for p in parts[:-1]:
        if isinstance(cur, list):
            try:
                cur = cur[int(p)]
            except (ValueError, IndexError):
                raise ConfigError(f"--set {key}: '{p}' is not a valid list index") from None
            continue
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict | list):
            raise ConfigError(f"--set {key}: '{p}' holds a value, not a section")
        cur = nxt
    if isinstance(cur, list):
        try:
            cur[int(parts[-1])] = parse_value(value)
        except (ValueError, IndexError):
            raise ConfigError(f"--set {key}: '{parts[-1]}' is not a valid list index") from None
    else:
        cur[parts[-1]] = parse_value(value)


def load_raw(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory; expected a YAML config file")
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} not found")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} is not a regular file; expected a YAML config file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def validate(raw: dict[str, Any]) -> RunConfig:
    _load_plugins(raw)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
    _validate_names(cfg)
    return cfg


def _load_plugins(raw: dict[str, Any]) -> None:
    """Import the plugins ``raw`` names (a malformed list is left to validation to report)."""
    specs = raw.get("plugins")
    if isinstance(specs, list) and all(isinstance(s, str) for s in specs):
        from fedslim import plugins

        plugins.load_plugins(specs)


def _resolve_plugin_files(raw: dict[str, Any], base: Path) -> None:
    """Plugin files named relative to ``base`` (the config file's folder) as absolute paths: the run
    folder's config.yaml then says which file ran, wherever the run is resumed from."""
    from fedslim.plugins import is_file_spec

    specs = raw.get("plugins")
    if isinstance(specs, list):
        raw["plugins"] = [str((base / s).resolve()) if isinstance(s, str) and is_file_spec(s)
                          and not Path(s).is_absolute() else s for s in specs]


def _validate_names(cfg: RunConfig) -> None:
    """Names that live in registries, and the algorithm's own parameters."""
    from fedslim import plugins
    from fedslim.registry import UnknownNameError

    try:
        plugins.DATASETS.get(cfg.data.dataset, field="data.dataset")
        plugins.MODELS.get(cfg.model.name, field="model.name")
        algo = plugins.ALGORITHMS.get(cfg.algorithm.name, field="algorithm.name")
        plugins.BACKENDS.get(cfg.engine.backend, field="engine.backend")
        for side in ("down", "up"):
            for i, st in enumerate(getattr(cfg.codec, side)):
                plugins.CODECS.get(st.name, field=f"codec.{side}.{i}.name")
    except UnknownNameError as e:
        raise ConfigError(str(e)) from None
    params_model = getattr(algo, "Params", None)
    if params_model is not None:
        try:
            params_model.model_validate(cfg.algorithm.params)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, params_model, "algorithm.params.")) from None
    check = getattr(algo, "check_config", None)
    if check is not None:
        try:
            check(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        from fedslim.codecs import build_pipeline

        for side in ("down", "up"):
            build_pipeline([s.model_dump() for s in getattr(cfg.codec, side)], field=f"codec.{side}",
                           downlink=side == "down")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _algorithm_params_model(raw: dict[str, Any]) -> type[BaseModel] | None:
    """The Params model of the algorithm ``raw`` names, or None when the name is not (yet) valid."""
    from fedslim import plugins

    section = raw.get("algorithm")
    name = section.get("name", AlgorithmConfig.model_fields["name"].default) if isinstance(section, dict) else None
    if not isinstance(name, str) or name not in plugins.ALGORITHMS:
        return None
    return getattr(plugins.ALGORITHMS.get(name), "Params", None)


def _seed_param_mapping(raw: dict[str, Any], assignment: str, params_model: type[BaseModel] | None) -> None:
    """Before ``--set algorithm.params.FIELD.KEY=V``, copy FIELD's default mapping into ``raw`` when the
    config does not set FIELD. Otherwise the new key would replace the defaults rather than join them:
    ``--set algorithm.params.rates.f=0.03125`` would leave HeteroFL with the one rate 'f'."""
    parts = [p for p in assignment.split("=", 1)[0].strip().split(".") if p]
    if params_model is None or len(parts) < 4 or parts[:2] != ["algorithm", "params"]:
        return
    section = raw.get("algorithm")
    params = section.get("params") if isinstance(section, dict) else None
    if params is not None and (not isinstance(params, dict) or parts[2] in params):
        return
    field = params_model.model_fields.get(parts[2])
    default = field.get_default(call_default_factory=True) if field is not None else None
    if isinstance(default, dict):
        raw.setdefault("algorithm", {}).setdefault("params", {})[parts[2]] = copy.deepcopy(default)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A config file (None: the defaults) with ``--set`` overrides, validated. Plugin files are found
    relative to the config file's folder (without a file, to the current folder)."""
    raw = load_raw(path)
    overrides = overrides or []
    base = Path(path).resolve().parent if path is not None else Path.cwd()
    if overrides:
        # The algorithm whose defaults a nested --set joins: the one named once every override is applied.
        final = copy.deepcopy(raw)
        for ov in overrides:
            apply_override(final, ov)
        _resolve_plugin_files(final, base)
        _load_plugins(final)
        params_model = _algorithm_params_model(final)
        for ov in overrides:
            _seed_param_mapping(raw, ov, params_model)
            apply_override(raw, ov)
    _resolve_plugin_files(raw, base)
    return validate(raw)


def params_defaults_comment(cfg: RunConfig) -> str:
    """YAML comment lines listing the ``algorithm.params`` that ``cfg`` leaves unset, with the default
    each takes and its description. Comments, not fields: some algorithms read a field written out
    differently from one left unset (HeteroFL refuses ``static_bn: true`` on a model without BN)."""
    from fedslim import plugins

    params_model = getattr(plugins.ALGORITHMS.get(cfg.algorithm.name), "Params", None)
    if params_model is None:
        return ""
    unset = [(k, f) for k, f in params_model.model_fields.items() if k not in cfg.algorithm.params]
    if not unset:
        return ""
    lines = [f"# algorithm.params left unset take these defaults ({cfg.algorithm.name}):"]
    for k, f in unset:
        value = yaml.safe_dump(f.get_default(call_default_factory=True), default_flow_style=True).strip()
        value = value.removesuffix("\n...").strip()
        lines.append(f"#   {k}: {value}" + (f"   # {f.description}" if f.description else ""))
    return "\n".join(lines) + "\n"


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
