"""Options declared once. An option set is a frozen dataclass; each field carries, with
:func:`option`, its meaning and the rule its value must follow. Validation
(:func:`validate`), the TOML and ``MTCKPT_*`` loader (:mod:`mtckpt.config`) and the
configuration reference (``tools/gen_config_docs.py``) all read these declarations, so
adding an option is one field."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``test`` says whether it is, ``expect`` says it in words."""

    test: Callable[[Any], bool]
    expect: str


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_at_least(least: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= least, f"an int >= {least}")


def int_between(low: int, high: int) -> Rule:
    return Rule(lambda v: _is_int(v) and low <= v <= high, f"an int in {low}..{high}")


def one_of(*choices: Any) -> Rule:
    shown = [repr(c) for c in choices]
    words = shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
    return Rule(lambda v: v in choices, words)


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.test(v), f"{rule.expect} or None")


POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 1, "a positive int")
POSITIVE_SECONDS = Rule(lambda v: _is_number(v) and v > 0, "> 0 seconds")
PATH = Rule(lambda v: isinstance(v, (str, os.PathLike)) and bool(str(v)), "a non-empty path")
TABLE = Rule(lambda v: isinstance(v, dict), "a table")
TEXT = Rule(lambda v: isinstance(v, str) and bool(v), "a non-empty string")
BOOL = Rule(lambda v: isinstance(v, bool), "true or false")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    rule: Rule | None = None,
    factory: Callable[[], Any] | None = None,
    kind: type | None = None,
) -> Any:
    """A field of an option set: its default (or ``factory``), its meaning, its rule, and
    ``kind`` where the file, variables and flags give another type than the field's (a URL
    that becomes an ObjectTier)."""
    metadata = {"help": " ".join(help.split()), "rule": rule, "kind": kind}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate(options: Any, prefix: str = "") -> None:
    """ConfigError naming the first field of ``options`` whose value breaks its rule:
    ``{prefix}{name} must be {expectation}, got {value!r}``."""
    for field in dataclasses.fields(options):
        rule = field.metadata.get("rule")
        value = getattr(options, field.name)
        if rule is not None and not rule.test(value):
            raise ConfigError(f"{prefix}{field.name} must be {rule.expect}, got {value!r}")


@dataclass(frozen=True)
class Kind:
    """A field's type as the loaders see it: ``base`` (str, int, float, bool, dict, list)
    and whether None is allowed."""

    base: type
    optional: bool


def kinds(cls: type) -> dict[str, Kind]:
    """The :class:`Kind` of every field of the option set ``cls``, from its annotations."""
    hints = typing.get_type_hints(cls)
    out = {}
    for field in dataclasses.fields(cls):
        if field.metadata.get("kind") is not None:
            out[field.name] = Kind(field.metadata["kind"], True)
            continue
        hint = hints[field.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        bases = [typing.get_origin(a) or a for a in args if a is not type(None)]
        if len(bases) != 1:
            raise TypeError(f"{cls.__name__}.{field.name}: one type (or None) per option")
        out[field.name] = Kind(bases[0], type(None) in args)
    return out


def comma_list(text: str) -> list[str]:
    """A list option as a variable or a flag writes it: ``a:1, b:2`` -> ``["a:1", "b:2"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")
