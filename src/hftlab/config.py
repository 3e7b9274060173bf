"""Configuration: dataclasses are the schema, YAML files are instances, dotted overrides on the CLI.

``load_config(files, overrides)`` returns a validated :class:`Config`. Every value remembers where it came
from (``file.yaml:LINE`` or ``command line``) so that a bad value is reported as one line naming the key
and its origin. Plugins with parameters (defenses, attacks) declare a ``Config`` dataclass of their own;
``defense=NAME`` selects the plugin and ``defense.KEY=V`` sets its parameters, checked against it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .bounds import bounds, one_of
from .errors import ConfigError  # defined with the other user errors, so config_files can raise it too


# the bounds live in hftlab.bounds; the old names stay importable from here for plugins written before it
rng, choices = bounds, one_of


@dataclass
class ModelConfig:
    """The model to attack and defend: ``organism`` or a hub id / local path of any HF causal LM."""

    name: str = "organism"
    dtype: str = field(default="auto", metadata=one_of("auto", "float32", "bfloat16", "float16"))
    template: str = field(default="auto", metadata=one_of("auto", "chat", "alpaca"))
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    safetensors_only: bool = True  # refuse pickled (.bin) weights unless turned off


@dataclass
class TrainConfig:
    """One training stage (alignment or user fine-tuning)."""

    lr: float = field(default=1e-3, metadata=bounds(0.0, 10.0))
    epochs: float = field(default=1.0, metadata=bounds(0.0, 1e6))
    max_steps: int = field(default=0, metadata=bounds(0))  # 0: derive from epochs
    batch_size: int = field(default=16, metadata=bounds(1))
    grad_accum: int = field(default=1, metadata=bounds(1))
    schedule: str = field(default="constant", metadata=one_of("constant", "cosine", "linear"))
    warmup_ratio: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    weight_decay: float = field(default=0.0, metadata=bounds(0.0))
    max_grad_norm: float = field(default=1.0, metadata=bounds(0.0))  # 0: no clipping
    optimizer: str = field(default="adamw", metadata=one_of("adamw", "sgd"))
    lora: bool = False
    lora_r: int = field(default=8, metadata=bounds(1))
    lora_alpha: float = field(default=16.0, metadata=bounds(0.0))
    lora_dropout: float = field(default=0.0, metadata=bounds(0.0, 1.0))
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    max_length: int = field(default=128, metadata=bounds(8))
    # finetune only: keep training the alignment stage's LoRA adapter (single-LoRA variant) instead of
    # merging it and adding a fresh one (the papers' default two-LoRA workflow); needs align.lora=true
    continue_adapter: bool = False


@dataclass
class DatasetSpec:
    """One dataset: a hub id, a local folder, or a .json/.jsonl/.csv file (``{split}`` in the path is
    replaced by the split name), and the names of the fields hftlab reads ("" = not used)."""

    path: str = ""
    name: str = ""  # hub config name (e.g. "main" for GSM8K)
    train: str = "train"  # split names
    test: str = "test"
    prompt: str = "prompt"
    response: str = ""
    input: str = ""
    label: str = ""
    category: str = ""


def _spec(path: str, **kw: str) -> Any:
    return field(default_factory=lambda: DatasetSpec(path=path, **kw))


@dataclass
class DataConfig:
    """Where alignment, provider-harmful and evaluation data come from."""

    source: str = field(default="organism", metadata=one_of("organism", "hub"))
    alignment_n: int = field(default=4000, metadata=bounds(1))
    harmful_n: int = field(default=1000, metadata=bounds(1))  # the provider's own harmful set (Booster, RepNoise…)
    # source=hub: real datasets (hub ids or local copies) with the papers' selections, see data/hub.py
    alignment_set: str = field(default="safe", metadata=one_of("safe", "refusal"))
    beavertails: DatasetSpec = _spec("PKU-Alignment/BeaverTails", train="30k_train", test="30k_test",
                                     response="response", label="is_safe", category="category")
    refusals: DatasetSpec = _spec("", test="", response="refusal")  # RepNoise refusal file (a local .json)
    sst2: DatasetSpec = _spec("stanfordnlp/sst2", test="validation", prompt="sentence", label="label")
    agnews: DatasetSpec = _spec("fancyzhx/ag_news", prompt="text", label="label")
    gsm8k: DatasetSpec = _spec("openai/gsm8k", name="main", prompt="question", response="answer")
    alpaca: DatasetSpec = _spec("tatsu-lab/alpaca", test="train", prompt="instruction", input="input",
                                response="output")


@dataclass
class AttackConfig:
    """The user's upload: ``name`` is a registered attack; ratio is p, n the number of samples."""

    name: str = "harmful-mix"
    ratio: float = field(default=0.1, metadata=bounds(0.0, 1.0))
    n: int = field(default=1000, metadata=bounds(1))
    seed: int = field(default=0, metadata=bounds(0))  # draws the harmful subset: every defense sees the same data
    params: dict[str, Any] = field(default_factory=dict)  # the attack's own Config (``attack.KEY=V``)


@dataclass
class DefenseConfig:
    """``name`` is a registered defense; ``params`` are checked against the defense's own Config."""

    name: str = "sft"
    params: dict[str, Any] = field(default_factory=dict)
    preset: str = field(default="", metadata=one_of("", "paper", "tuned"))  # tuned: configs/organism/tuned/<name>.yaml


@dataclass
class EvalConfig:
    judge: str = "organism"
    split: str = field(default="test", metadata=one_of("test", "validation"))  # validation: prompts after the test ones
    n_harmful: int = field(default=400, metadata=bounds(1))
    n_task: int = field(default=400, metadata=bounds(1))
    max_new_tokens: int = field(default=40, metadata=bounds(1))
    batch_size: int = field(default=128, metadata=bounds(1))
    evaluate_aligned: bool = True
    judge_model: str = ""  # a model judge's hub id / local path, or the api judge's model name ("" = default)
    judge_url: str = ""  # api judges: base URL of an OpenAI-compatible endpoint ("" = $HFTLAB_API_BASE or OpenAI)
    judge_key_env: str = "OPENAI_API_KEY"  # api judges: the environment variable holding the key
    judge_batch_size: int = field(default=16, metadata=bounds(1))


@dataclass
class GuardrailConfig:
    """The provider's filter between upload and fine-tuning: ``name`` is a registered judge that scores
    each user sample (prompt, response); flagged samples are dropped ("" = no guardrail)."""

    name: str = ""
    threshold: float = field(default=0.5, metadata=bounds(0.0, 1.0))  # on the judge's score, if it gives one


def _align_default() -> TrainConfig:
    """The organism's alignment: full fine-tuning, lr 2e-3 decayed (cosine, which keeps benign answers
    better than a constant lr), 3 epochs (1 epoch made the alignment-stage defenses ineffective; on the
    current world, version 3 in docs/organism.md, 3 epochs answer held-out benign prompts at 90.6 % over
    six seeds, 2 epochs at 89.4 %)."""
    return TrainConfig(lr=2e-3, epochs=3.0, batch_size=32, schedule="cosine")


def _finetune_default() -> TrainConfig:
    return TrainConfig(lr=2e-3, epochs=2.0, batch_size=16, lora=True)


@dataclass
class Config:
    """A whole run: align → finetune → repair → evaluate."""

    seed: int = field(default=0, metadata=bounds(0))
    task: str = "sentiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    align: TrainConfig = field(default_factory=_align_default)
    finetune: TrainConfig = field(default_factory=_finetune_default)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guardrail: GuardrailConfig = field(default_factory=GuardrailConfig)
    out_dir: str = "runs"
    store: str = ""  # SQLite path; "" = <out_dir>/results.sqlite
    threads: int = field(default=1, metadata=bounds(1))
    # Experiment tracker a finished run is sent to (hftlab.tracking); not part of the run's identity.
    report_to: str = field(default="none", metadata=one_of("none", "wandb", "mlflow"))


# Sections whose string shorthand ``section=value`` sets ``section.name``.
_NAMED = {"model", "attack", "defense"}
# Plugin sections whose free keys go to ``params`` and are checked against the plugin's Config.
_PLUGIN_PARAMS = {"defense": "defense", "attack": "attack"}


def _with_lines(path: Path) -> tuple[Any, dict[str, str]]:
    """Parse YAML, returning data and a map dotted-key -> 'file:line'."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the config file ({err})") from None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    origins: dict[str, str] = {}

    def walk(n: Any, prefix: str) -> Any:
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                origins[key] = f"{path}:{k.start_mark.line + 1}"
                out[k.value] = walk(v, key + ".")
            return out
        return yaml.safe_load(yaml.serialize(n)) if n is not None else None

    data = walk(node, "") if node is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a config file must be a mapping of keys")
    return data, origins


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=V`` -> ("a.b", V) with V parsed as a YAML scalar/list."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}': expected KEY=VALUE (command line)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Merge YAML files then overrides onto the defaults; validate; return the Config."""
    from .config_files import find_config

    flat: dict[str, tuple[Any, str]] = {}
    for f in files:
        path = find_config(f)  # a path, or a shipped config's name (``defenses/lisa``, ``lisa``)
        data, origins = _with_lines(path)
        base = data.pop("base", None)
        data.pop("tune", None)  # a defense file's strength grid: read by ``hftlab tune``, not a run key
        if base is not None:  # one level of inheritance: `base: other.yaml` relative to this file
            parent = load_flat(path.parent / base)
            flat.update(parent)
        for key, value in _flatten(data).items():
            flat[key] = (value, origins.get(key, str(path)))
    for text in overrides:
        key, value = parse_override(text)
        flat[key] = (value, "command line")
    return build(flat)


def load_flat(path: Path) -> dict[str, tuple[Any, str]]:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    data, origins = _with_lines(path)
    data.pop("tune", None)
    return {k: (v, origins.get(k, str(path))) for k, v in _flatten(data).items()}


def build(flat: dict[str, tuple[Any, str]]) -> Config:
    """Apply dotted keys onto a default Config, checking names, types and ranges."""
    cfg = Config()
    # shorthands first so that `defense=lisa defense.rho=1` works in any order
    ordered = sorted(flat.items(), key=lambda kv: kv[0].count("."))
    for key, (value, origin) in ordered:
        _set(cfg, key, value, origin)
    validate(cfg)
    _check_budget(cfg, flat)
    _check_plugins(cfg, flat)
    return cfg


def _check_budget(cfg: Config, flat: dict[str, tuple[Any, str]]) -> None:
    """User fine-tuning must train: ``finetune.epochs=0`` with no ``max_steps`` would still take one step.
    (``align.epochs=0`` with no ``max_steps`` is allowed: it uses the base model as the aligned one.)"""
    if cfg.finetune.epochs == 0 and cfg.finetune.max_steps == 0:
        origin = flat.get("finetune.epochs", (None, "config"))[1]
        raise ConfigError(f"finetune.epochs: 0 trains nothing; set finetune.epochs > 0 or finetune.max_steps "
                          f"({origin})")


def _set(cfg: Config, key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    head = parts[0]
    if len(parts) == 1 and head in _NAMED and not isinstance(value, dict):
        parts = [head, "name"]
    own = {f.name for f in dataclasses.fields(getattr(cfg, head))} if head in _PLUGIN_PARAMS else set()
    if head in _PLUGIN_PARAMS and len(parts) >= 2 and parts[1] not in own:
        getattr(cfg, head).params[".".join(parts[1:])] = _Origin(value, origin)
        return
    if head in _PLUGIN_PARAMS and len(parts) >= 3 and parts[1] == "params":
        getattr(cfg, head).params[".".join(parts[2:])] = _Origin(value, origin)
        return
    obj: Any = cfg
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        if part not in fields:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(
                f"{key}: unknown key '{part}' in {where} (known: {', '.join(fields)}) ({origin})"
            )
        f = fields[part]
        if i == len(parts) - 1 and dataclasses.is_dataclass(getattr(obj, part)):
            if value in (None, {}):  # an empty section (`align:` in a file) keeps its defaults
                return
            raise ConfigError(f"{key}: is a section, not a value: set its keys ({key}.KEY=VALUE), got {value!r} "
                              f"({origin})")
        if i == len(parts) - 1:
            setattr(obj, part, coerce(value, _hint(type(obj), part, f.type), key, origin, f.metadata))
        else:
            obj = getattr(obj, part)


@dataclass
class _Origin:
    value: Any
    origin: str


_HINTS: dict[type, dict[str, Any]] = {}


def _hint(owner: type, name: str, declared: Any) -> Any:
    if owner not in _HINTS:
        _HINTS[owner] = typing.get_type_hints(owner)
    return _HINTS[owner].get(name, declared)


def coerce(value: Any, tp: Any, key: str, origin: str, meta: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted for floats); return it."""
    if isinstance(tp, str):
        tp = eval(tp, {**vars(typing), "Any": Any, "list": list, "dict": dict})  # annotations are ours
    origin_t = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_t in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key, origin, meta)
            except ConfigError as e:
                errs.append(e)
        raise errs[0]
    if tp is Any:
        return value
    if origin_t is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} ({origin})")
        return [coerce(v, args[0] if args else Any, key, origin) for v in value]
    if origin_t is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r} ({origin})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r} ({origin})")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({origin})")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({origin})")
        value = float(value)
        if not math.isfinite(value):  # nan passes every range check, inf every one-sided bound
            raise ConfigError(f"{key}: expected a finite number, got {value!r} ({origin})")
    elif tp is str:
        if not isinstance(value, str):
            value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({origin})")
    _check_meta(value, meta or {}, key, origin)
    return value


def _check_meta(value: Any, meta: Any, key: str, origin: str) -> None:
    lo, hi = meta.get("range", (None, None))
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r} ({origin})")
    if lo is not None and value < lo or hi is not None and value > hi:
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{key}: {value!r} is out of range (must be {bound}) ({origin})")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(meta['choices'])} ({origin})")


def validate(cfg: Config) -> None:
    """Re-check every field (defaults included) and the cross-field rules."""

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, f"{prefix}{f.name}.")
            elif f.metadata:
                _check_meta(v, f.metadata, f"{prefix}{f.name}", "config")

    walk(cfg, "")
    if cfg.finetune.continue_adapter and not (cfg.align.lora and cfg.finetune.lora):
        raise ConfigError("finetune.continue_adapter: needs align.lora=true and finetune.lora=true (config)")
    real_tasks = ("sst2", "agnews", "gsm8k", "alpaca")
    if cfg.data.source == "organism" and cfg.task in real_tasks:
        raise ConfigError(f"task: '{cfg.task}' needs real data; set data.source=hub (config)")


def _check_plugins(cfg: Config, flat: dict[str, tuple[Any, str]]) -> None:
    """Names must be registered; plugin params must match the plugin's Config dataclass."""
    from . import registry

    def origin_of(key: str) -> str:
        return flat.get(key, (None, "default"))[1]

    for kind, key in (("attack", "attack.name"), ("defense", "defense.name"), ("judge", "eval.judge"),
                      ("task", "task")):
        value = {"attack": cfg.attack.name, "defense": cfg.defense.name, "judge": cfg.eval.judge,
                 "task": cfg.task}[kind]
        if kind == "task" and cfg.model.name != "organism" and value not in registry.names("task"):
            continue
        try:
            registry.entry(kind, value)
        except registry.RegistryError as e:
            shown = "defense" if key == "defense.name" else "attack" if key == "attack.name" else key
            raise ConfigError(f"{shown}: {e} ({origin_of(key) if key in flat else origin_of(shown)})") from None
    if cfg.guardrail.name and cfg.guardrail.name not in registry.names("judge"):
        raise ConfigError(f"guardrail.name: unknown judge '{cfg.guardrail.name}'; known: "
                          f"{', '.join(registry.names('judge'))} ({origin_of('guardrail.name')})")
    if cfg.defense.preset == "tuned":
        cfg.defense.params = {**preset_params(cfg.defense.name, origin_of("defense.preset")), **cfg.defense.params}
    cfg.defense.params = plugin_params(cfg.defense.name, cfg.defense.params)
    cfg.attack.params = plugin_params(cfg.attack.name, cfg.attack.params, kind="attack")
    _check_requires(cfg, origin_of)


def _check_requires(cfg: Config, origin_of: Callable[[str], str]) -> None:
    """A defense may declare run settings it is defined for (``requires = {"finetune.lora": True}`` on its
    class, e.g. SaLoRA, which acts on the adapter); a config that contradicts one fails here, naming the key."""
    from . import registry

    def shown(v: Any) -> str:  # as written on the command line: true/false
        return str(v).lower() if isinstance(v, bool) else str(v)

    for key, want in (getattr(registry.get("defense", cfg.defense.name), "requires", None) or {}).items():
        have = cfg
        for part in key.split("."):
            have = getattr(have, part)
        if have != want:
            raise ConfigError(f"{key}: defense '{cfg.defense.name}' needs {key}={shown(want)}, got {shown(have)} "
                              f"({origin_of(key)})")


def tuned_preset_path(defense: str) -> Path:
    """Where ``hftlab tune`` writes (and ``defense.preset=tuned`` reads) a defense's calibrated values."""
    from .config_files import SHIPPED

    return SHIPPED / "organism" / "tuned" / f"{defense}.yaml"


def preset_params(defense: str, origin: str) -> dict[str, Any]:
    """The parameters of a defense's tuned preset, each with the file line it comes from."""
    path = tuned_preset_path(defense)
    if not path.is_file():
        raise ConfigError(f"defense.preset: no tuned preset for defense '{defense}' (run `hftlab tune "
                          f"{defense}` to make {path.name} in configs/organism/tuned/) ({origin})")
    flat = load_flat(path)
    return {k.split(".", 1)[1]: _Origin(v, o) for k, (v, o) in flat.items()
            if k.startswith("defense.") and k != "defense.name"}


# plugin parameters renamed for one name per concept (λ was ``lamb`` in some plugins): old name -> new name
RENAMED_PARAMS = {"lamb": "lam"}


def plugin_params(name: str, raw: dict[str, Any], kind: str = "defense") -> dict[str, Any]:
    """Validate ``defense.*`` (or ``attack.*``) keys against the plugin's Config dataclass; returns every
    parameter's plain value, the defaults included, so that stage and run hashes change when a default does."""
    from . import registry

    cls = registry.get(kind, name)
    schema = getattr(cls, "Config", None)
    plain: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
    for k, v in raw.items():
        value, origin = (v.value, v.origin) if isinstance(v, _Origin) else (v, "config")
        if k not in known and RENAMED_PARAMS.get(k) in known:  # an old name: still accepted, with a warning
            logging.getLogger(__name__).warning("%s.%s is deprecated: use %s.%s (%s)", kind, k, kind,
                                                RENAMED_PARAMS[k], origin)
            k = RENAMED_PARAMS[k]
        if k not in known:
            raise ConfigError(
                f"{kind}.{k}: unknown parameter for {kind} '{name}' "
                f"(known: {', '.join(known) or 'none'}) ({origin})"
            )
        plain[k] = coerce(value, _hint(schema, k, known[k].type), f"{kind}.{k}", origin, known[k].metadata)
    if schema is not None:
        inst = schema(**plain)
        check = getattr(inst, "check", None)
        if check is not None:
            try:
                check()
            except ValueError as e:
                raise ConfigError(f"{kind}.{e} ({kind} '{name}')") from None
        return dataclasses.asdict(inst)
    return plain


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (for manifests and the store)."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from :func:`to_dict` output (used by sweeps and resumed runs)."""
    flat = {k: (v, "saved config") for k, v in _flatten({k: v for k, v in d.items()}).items()}
    return build(flat)
