"""Command-line flags derived from a frozen config dataclass: one flag per field, same defaults, and the help text
the field carries (`option(default, help=...)`)."""

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")

HELP = "help"  # the key of a field's help text in its metadata


def _scalar_type(hint: Any) -> type:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def option(default: Any = dataclasses.MISSING, *, help: str) -> Any:
    """A config field with its flag's help text: what it does and its unit (the default is added to the flag)."""
    return dataclasses.field(default=default, metadata={HELP: help})


def field_help(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get(HELP, "")


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        shown = "required" if required else f"default: {'empty' if default == '' else default}"
        text = f"{field_help(f)} ({shown})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, type=kind, default=default, required=required, help=text)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})  # type: ignore[call-arg]


def parse_config(cls: type[T], argv: Sequence[str] | None, description: str) -> T:
    # no prefix matching: an old --api-keys VALUE must not be taken for --api-keys-file
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    add_config_flags(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))
