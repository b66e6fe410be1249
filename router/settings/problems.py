"""Pydantic's validation errors, translated into :class:`ConfigProblem`s an installer can act on."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, NamedTuple

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import BaseModel
from pydantic_core import ErrorDetails

from .values import show_toml

#: The tables of the file by name, each with its model: what an unknown key is compared against.
Sections = Mapping[str, type[BaseModel]]


class ConfigProblem(NamedTuple):
    """One thing wrong with the configuration."""

    location: str  # dotted key, e.g. "csms.url"; "" for the file as a whole
    message: str  # what is wrong and what is allowed, in plain words


_TYPE_WORDS = {"int_type": "a whole number", "float_type": "a number", "finite_number": "a finite number"}
_TYPE_WORDS |= {"string_type": "a string in quotes", "bool_type": "true or false"}
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "string_too_short", "string_too_long"}


def translate(detail: ErrorDetails, sections: Sections) -> ConfigProblem:
    """Turn one pydantic error about the file whose tables are ``sections`` into words an installer can act on."""
    loc = tuple(str(part) for part in detail["loc"])
    kind, got, ctx = detail["type"], detail["input"], detail.get("ctx", {})
    if kind == "config":
        return ConfigProblem(".".join((*loc, ctx["field"])), str(ctx["message"]))
    if kind == "value_error":
        message = str(ctx["error"])
    elif kind == "extra_forbidden":
        message = _unknown_key(loc, got, sections)
    elif kind == "model_type":
        message = f"must be a table (a [{'.'.join(loc)}] section), got {show_toml(got)}"
    elif kind in _TYPE_WORDS:
        message = f"must be {_TYPE_WORDS[kind]}, got {show_toml(got)}"
    elif kind == "literal_error":
        message = f"must be one of {ctx['expected']}, got {show_toml(got)}"
    elif kind in _BOUNDS:
        message = _range(loc, got, sections, ctx)
    else:  # a case this table does not foresee: pydantic's own words beat none
        message = f"{detail['msg']}, got {show_toml(got)}"
    return ConfigProblem(".".join(loc), message)


def _model_at(loc: tuple[str, ...], sections: Sections) -> type[BaseModel] | None:
    """The settings model of the table at ``loc`` (e.g. ("stations", "security")), if there is one."""
    model: type[BaseModel] | None = sections.get(loc[0])
    for part in loc[1:]:
        info = model.model_fields.get(part) if model is not None else None
        annotation = info.annotation if info is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _unknown_key(loc: tuple[str, ...], got: object, sections: Sections) -> str:
    key, section = loc[-1], _model_at(loc[:-1], sections) if len(loc) >= 2 else None
    known = list(section.model_fields) if section else list(sections)
    guess = difflib.get_close_matches(key, known, n=1)
    homes = [name for name, other in sections.items() if key in other.model_fields and other is not section]
    hint = f"; did you mean {guess[0]!r}?" if guess else f"; it belongs in [{homes[0]}]" if homes else ""
    if len(loc) > 1:
        return f"unknown key {key!r}{hint} (known keys: {', '.join(known)})"
    what = f"unknown section [{key}]" if isinstance(got, Mapping) else f"unknown key {key!r} outside any section"
    return f"{what}{hint} (known sections: {', '.join(known)})"


def _range(loc: tuple[str, ...], got: object, sections: Sections, ctx: Mapping[str, Any] | None = None) -> str:
    """What values a bounded key allows, in words, from the field's own bounds (or the error's, deeper down)."""
    info = sections[loc[0]].model_fields.get(loc[1]) if len(loc) == 2 and loc[0] in sections else None
    unit = " seconds" if loc[-1].endswith("_s") else " bytes" if loc[-1].endswith("_bytes") else ""
    low = high = None
    for rule in info.metadata if info else []:
        low = rule.ge if isinstance(rule, Ge) else rule.min_length if isinstance(rule, MinLen) else low
        high = rule.le if isinstance(rule, Le) else rule.max_length if isinstance(rule, MaxLen) else high
    if info is None and ctx:
        # A key deeper in a table ([site.grid], [[site.stations]]): the error names the bound it broke.
        low = ctx.get("ge", ctx.get("gt", ctx.get("min_length")))
        high = ctx.get("le", ctx.get("lt", ctx.get("max_length")))
        if low is not None:
            return f"must be {'above' if 'gt' in ctx else 'at least'} {show_toml(low)}{unit}, got {show_toml(got)}"
        if high is not None:
            return f"must be {'below' if 'lt' in ctx else 'at most'} {show_toml(high)}{unit}, got {show_toml(got)}"
    shown = show_toml(got)
    if isinstance(got, str):
        unit, shown = " characters", f"{len(got)} characters"
    if low is not None and high is not None:
        return f"must be from {show_toml(low)} to {show_toml(high)}{unit}, got {shown}"
    if low is not None:
        return f"must be at least {show_toml(low)}{unit}, got {shown}"
    return f"must be at most {show_toml(high)}{unit}, got {shown}"
