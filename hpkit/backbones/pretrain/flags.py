"""The command-line dialect of ``hpkit pretrain`` and ``hpkit align-attention``: their settings are
flat dataclasses (:class:`~hpkit.backbones.pretrain.PretrainConfig`, :class:`~hpkit.backbones.alignment.AlignConfig`),
set with ``--set field=value`` (repeatable), as ``hpkit train --set section.field=value`` sets its
nested configuration; an unknown field is an error that suggests the closest one. The older form
``--field-name value`` still works; both parse a value the same way (:func:`parse_setting`), and
``--set`` wins where both set a field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from typing import Any, Iterable

__all__ = ["add_config_flags", "config_from_flags", "parse_setting", "parse_settings"]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def parse_setting(cls: type, name: str, text: str) -> Any:
    """The value of field ``name`` of the dataclass ``cls`` from a command-line string: numbers
    comma-separated for a tuple, true/false (1/0, yes/no, on/off) for a flag, ``none`` for an optional
    field left unset, else the field's type.

    Raises:
        ValueError: the string does not fit the field (the message names the field).
    """
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default, annotation = _default(f), str(f.type)
    try:
        if text.strip().lower() in ("none", "null") and "None" in annotation:
            return None
        if isinstance(default, tuple):
            values = tuple(float(v) for v in text.split(","))
            if len(values) != len(default):
                raise ValueError(f"expected {len(default)} comma-separated numbers")
            return values
        kind = type(default) if default is not None else next(
            (t for t in (bool, int, float) if t.__name__ in annotation), str)
        if kind is bool:
            if text.strip().lower() in ("true", "1", "yes", "on"):
                return True
            if text.strip().lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        return kind(text)
    except ValueError as err:
        raise ValueError(f"bad value {text!r} for {name}: {err}") from None


def parse_settings(cls: type, items: Iterable[str]) -> dict[str, Any]:
    """``["lr=1e-3", "global_crop_scale=0.5,1"]`` -> ``{"lr": 0.001, "global_crop_scale": (0.5, 1.0)}``
    for the fields of the dataclass ``cls`` (dashes in names are read as underscores).

    Raises:
        ValueError: an item without ``=``, an unknown field (with the closest one, and the valid
            ones), or a value that does not fit its field.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for item in items:
        if "=" not in item:
            first = dataclasses.fields(cls)[0]
            raise ValueError(f"--set {item!r} must look like field=value, e.g. --set {first.name}={_default(first)}")
        key, text = (part.strip() for part in item.split("=", 1))
        name = key.replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown {cls.__name__} setting {key!r}; {hint}valid keys: {', '.join(names)}")
        out[name] = parse_setting(cls, name, text)
    return out


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--set FIELD=VALUE`` (repeatable) for the fields of the dataclass ``cls``, and the older
    ``--field-name V`` per field (its type and default as help)."""
    group = parser.add_argument_group(
        f"settings ({cls.__name__})", "--set FIELD=VALUE, repeatable (or the older --FIELD-NAME VALUE); tuples "
        "comma-separated, flags true/false, none for an unset optional field")
    group.add_argument("--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
                       help="set a field, e.g. --set lr=1e-3")
    for f in dataclasses.fields(cls):
        value = _default(f)
        kind = "comma-separated" if isinstance(value, tuple) else type(value).__name__
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, metavar="V", help=f"{kind} (default {value})")


def config_from_flags(args: argparse.Namespace, cls: type):
    """The ``cls`` instance of the parsed :func:`add_config_flags` options: the per-field flags, then
    ``--set`` (which wins); unset fields keep their defaults."""
    texts = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    overrides = {name: parse_setting(cls, name, text) for name, text in texts.items()}
    return cls(**overrides | parse_settings(cls, getattr(args, "settings", None) or []))
