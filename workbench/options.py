"""Declared options of a component, read from its constructor: name, type, default and one line of help.

A component declares its options once, where it is written: the constructor's keyword arguments (types from
their annotations, defaults from the signature) and an `Options:` section in the class docstring, one
`name: help` line each. A help line may state a range in words — "(at least 1)", "(at most 8)",
"(between 0 and 1)" — and the check reads it from there, so the form, the check and the reader see one text.

`declared_options` lists them (the app builds its forms from the list), `check_options` converts and checks a
mapping of values against them with a one-line reason (config checks, `build_integrator`, the app's forms all
call it), and `from_form` turns what a form field holds (a string in a text box, a float in a number box) into
the option's value.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .errors import ConfigError

_PLAIN = {bool: "bool", int: "int", float: "float", str: "str"}


@dataclass(frozen=True)
class Option:
    """One option as a form shows it. `type`: bool, int, float, str, choice (one of `choices`), list (of `item`
    values), union (any of `members`, typed as text) or any (not checked: e.g. a file path object)."""

    name: str
    type: str
    default: Any = None
    help: str = ""
    choices: tuple = ()
    optional: bool = False
    """None is a valid value (an empty field): the component picks its own."""
    item: str | None = None
    members: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def declared_options(target: Callable | type, skip: tuple[str, ...] = ("self", "context")) -> list[Option]:
    """The options of a class (its constructor's keyword arguments, help from the class docstring), of a
    dataclass (its fields) or of a function (its parameters, help from its docstring)."""
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        params = [(f.name, hints[f.name], f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
                  for f in dataclasses.fields(target)]
        doc = target.__doc__
    else:
        function = target.__init__ if isinstance(target, type) else target
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # noqa: BLE001 -- an annotation that does not resolve is simply not checked
            hints = {}
        signature = inspect.signature(function)
        params = [(n, hints.get(n, Any), None if p.default is p.empty else p.default)
                  for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        doc = target.__doc__
    helps = option_help(doc)
    return [_option(name, hint, default, helps.get(name, "")) for name, hint, default in params
            if name not in skip and name != "self"]


def option_help(doc: str | None) -> dict[str, str]:
    """`name: help` lines of a docstring's `Options:` section (continuation lines indented deeper join in)."""
    helps: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    if "Options:" not in [line.strip() for line in lines]:
        return helps
    start = [line.strip() for line in lines].index("Options:") + 1
    indent, name = None, None
    for line in lines[start:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        match = re.match(r"\s*(\w+):\s*(.*)", line)
        if depth == indent and match:
            name = match.group(1)
            helps[name] = match.group(2).strip()
        elif name is not None:
            helps[name] += " " + line.strip()
    return helps


def _option(name: str, hint: Any, default: Any, help: str) -> Option:
    optional, kinds = False, [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(kinds) < len(typing.get_args(hint))
    low, high = _range(help)
    common = dict(name=name, default=default, help=help, optional=optional, minimum=low, maximum=high)
    choices: list = []
    for kind in kinds:
        if typing.get_origin(kind) is Literal:
            choices += list(typing.get_args(kind))
        elif kind is bool and any(typing.get_origin(k) is Literal for k in kinds):
            choices += [True, False]
    if choices:
        return Option(type="choice", choices=tuple(choices), **common)
    if len(kinds) == 1 and kinds[0] in _PLAIN:
        return Option(type=_PLAIN[kinds[0]], **common)
    if len(kinds) == 1 and typing.get_origin(kinds[0]) in (list, tuple):
        (item, *_) = typing.get_args(kinds[0]) or (Any,)
        return Option(type="list", item=_PLAIN.get(item), **common)
    if kinds and all(k in _PLAIN for k in kinds):
        return Option(type="union", members=tuple(_PLAIN[k] for k in kinds), **common)
    return Option(type="any", **common)


def _range(help: str) -> tuple[float | None, float | None]:
    """The range a help line states in words."""
    number = r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)"
    if m := re.search(rf"\(between {number} and {number}\)", help):
        return float(m.group(1)), float(m.group(2))
    low = re.search(rf"\(at least {number}\)", help)
    high = re.search(rf"\(at most {number}\)", help)
    return (float(low.group(1)) if low else None), (float(high.group(1)) if high else None)


def check_options(what: str, declared: list[Option], values: dict[str, Any]) -> dict[str, Any]:
    """`values` converted to the declared types (an int where a float is declared becomes a float); raises
    ConfigError with one line naming the option and the reason: unknown, wrong type, out of range, not a choice."""
    by_name = {o.name: o for o in declared}
    out = {}
    for key, value in (values or {}).items():
        if key not in by_name:
            raise ConfigError(f"Unknown option '{key}' for {what}. Valid options: {', '.join(by_name) or 'none'}")
        out[key] = check_value(what, by_name[key], value)
    return out


def check_value(what: str, option: Option, value: Any) -> Any:
    """One value converted to the option's type, or ConfigError saying why it cannot be."""
    where = f"Option '{option.name}' of {what}"
    if value is None:
        if option.optional or option.default is None or option.type == "any":
            return None
        raise ConfigError(f"{where} needs a value (default {_text(option.default)})")
    kind = option.type
    if kind == "any":
        return value
    if kind == "choice":
        for choice in option.choices:
            if value == choice and type(value) is type(choice):
                return choice
        raise ConfigError(f"{where} must be one of {', '.join(_text(c) for c in option.choices)}, got {value!r}")
    if kind == "union":
        for member in option.members:
            try:
                return _plain(member, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {' or '.join(option.members)}, got {value!r}")
    if kind == "list":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        items = [_plain(option.item, v, where) if option.item else v for v in value]
        for v in items:
            _in_range(option, v, where)
        return items
    value = _plain(kind, value, where)
    _in_range(option, value, where)
    return value


def _plain(kind: str, value: Any, where: str) -> Any:
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, float) and value.is_integer():  # a number box holds floats
        return int(value)
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    noun = {"bool": "bool (true or false)", "int": "int (a whole number)", "float": "float (a number)",
            "str": "str (text)"}[kind]
    raise ConfigError(f"{where} must be {noun}, got {value!r}")


def _in_range(option: Option, value: Any, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if option.minimum is not None and value < option.minimum:
        raise ConfigError(f"{where} must be at least {_text(option.minimum)}, got {value}")
    if option.maximum is not None and value > option.maximum:
        raise ConfigError(f"{where} must be at most {_text(option.maximum)}, got {value}")


def _text(value: Any) -> str:
    """How a form shows a value: true/false for booleans, whole numbers without .0, lists comma-separated."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value)
    return "" if value is None else str(value)


def to_form(option: Option, value: Any) -> Any:
    """What the option's form field shows for `value`: a checkbox a bool, a number box a number (None empty),
    a dropdown or text box a string."""
    if option.type in ("bool", "int", "float"):
        return value
    return _text(value)


def from_form(what: str, option: Option, raw: Any) -> Any:
    """What a form field holds, converted and checked: an empty box is None (the component's own default), a
    list box holds comma-separated items, a choice or union box holds text."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return check_value(what, option, None)
    if isinstance(raw, str) and option.type != "str":
        text = raw.strip()
        if option.type == "choice":
            match = [c for c in option.choices if _text(c) == text]
            if not match:
                raise ConfigError(f"Option '{option.name}' of {what} must be one of "
                                  f"{', '.join(_text(c) for c in option.choices)}, got {text!r}")
            return match[0]
        if option.type == "list":
            raw = [_parse_word(word.strip(), option.item) for word in text.split(",") if word.strip()]
        elif option.type == "union":  # text reads as a number where it is one: "2" → 2, "all" stays text
            for member in sorted(option.members, key=lambda m: m == "str"):
                try:
                    return check_value(what, option, _parse_word(text, member))
                except ConfigError:
                    continue
        else:
            raw = _parse_word(text, option.type)
    return check_value(what, option, raw)


def _parse_word(word: str, kind: str | None) -> Any:
    """Text → the kind's value where it reads as one (else the text itself, which the check then refuses)."""
    try:
        if kind == "int":
            return int(word)
        if kind == "float":
            return float(word)
    except ValueError:
        return word
    if kind == "bool" and word.lower() in ("true", "false"):
        return word.lower() == "true"
    return word


def changed(declared: list[Option], values: dict[str, Any]) -> dict[str, Any]:
    """Only the values that differ from the declared defaults: what a saved config needs to say."""
    defaults = {o.name: o.default for o in declared}
    return {k: v for k, v in values.items() if k not in defaults or defaults[k] != v or type(defaults[k]) is not type(v)}
