"""YAML configuration files: read them, and say every problem in one line.

The fleet file (``comfyfleet.profiles``) and the workspace manifest
(``comfyfleet.manifest``) are pydantic models read from YAML. Both turn a
problem into one ``ConfigError`` (or subclass) line that names the file, the
dotted field (``models[2].dest``), what was expected and the YAML line::

    fleet.yaml: profiles.sdxl.max_price: expected a number >= 0, got -1 (line 7)

A ``YamlErrors`` holds what differs between the two files (the error class, how
long a shown string may be, a few extra expectations); everything else is here.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, NoReturn, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from comfyfleet.errors import ConfigError

__all__ = [
    "EXPECTED",
    "YamlErrors",
    "dotted",
    "kind",
    "line_of",
    "show",
]

E = TypeVar("E", bound=ConfigError)

_BOUNDS: Final = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}

#: What a pydantic error type means, as "expected ..., got VALUE".
EXPECTED: Final[Mapping[str, str]] = {
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string (quote it in YAML)",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


@dataclass(frozen=True)
class YamlErrors(Generic[E]):
    """How one kind of YAML file reads and reports its problems.

    ``error_type`` is what it raises; ``width`` how many characters of a string
    value an error shows; ``expected`` the pydantic error types it explains;
    ``unknown_first`` whether a misspelt key is named before the other errors
    (it also makes the real key "missing"); ``hidden`` the fields never offered
    as "did you mean" (set by the loader, not written in the file).
    """

    error_type: type[E]
    width: int = 40
    expected: Mapping[str, str] = field(default_factory=lambda: dict(EXPECTED))
    unknown_first: bool = True
    hidden: Collection[str] = ()

    def show(self, value: Any) -> str:
        """``value`` as an error message shows it (YAML spellings, long strings cut)."""
        return show(value, width=self.width)

    def read(self, path: Path) -> str:
        """The file's text; a missing, unreadable or non-UTF-8 file is one error line."""
        source = str(path)
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise self.error_type("no such file", source=source) from None
        except IsADirectoryError:
            raise self.error_type("expected a file, found a directory", source=source) from None
        except (OSError, UnicodeDecodeError) as error:
            raise self.error_type(f"cannot read the file: {error}", source=source) from None

    def load(self, text: str, source: str) -> Any:
        """The YAML document in ``text``; a syntax error is one line with its position."""
        try:
            return yaml.safe_load(text)
        except yaml.MarkedYAMLError as error:
            raise self.error_type(_yaml_reason(error), source=source) from None
        except yaml.YAMLError as error:
            raise self.error_type(f"invalid YAML: {error}", source=source) from None

    def error(self, reason: str, path: Sequence[str | int], text: str, source: str) -> E:
        """An error for the field at ``path``, with its line in ``text`` when found."""
        line = line_of(text, path) if text else None
        if line is not None:
            reason = f"{reason} (line {line})"
        return self.error_type(reason, source=source, field=dotted(path) or None)

    def invalid(
        self,
        error: ValidationError,
        model: type[BaseModel],
        text: str,
        source: str,
        *,
        prefix: Sequence[str | int] = (),
    ) -> NoReturn:
        """Raise the first problem of ``model``'s validation as one line.

        ``prefix`` is where the validated data stands in the file (``["defaults"]``).
        """
        path, reason = self.describe(error, model, prefix=prefix)
        raise self.error(reason, path, text, source) from None

    def describe(
        self, error: ValidationError, model: type[BaseModel], *, prefix: Sequence[str | int] = ()
    ) -> tuple[list[str | int], str]:
        """The first error of a validation: its path as written in the file and a short reason."""
        errors = error.errors(include_url=False)
        first = errors[0]
        if self.unknown_first:
            # A misspelt key also makes the real one "missing": name the typo, not the gap.
            first = next((e for e in errors if e["type"] == "extra_forbidden"), first)
        loc = [*prefix, *first["loc"]]
        kind_ = first["type"]
        ctx = first.get("ctx") or {}
        value = first.get("input")
        if kind_ == "missing":
            reason = "expected a value: the field is required"
        elif kind_ == "extra_forbidden":
            known = _fields_at(model, list(first["loc"]))
            reason = _unknown_field(str(loc[-1]), [k for k in known if k not in self.hidden])
        elif kind_ in _BOUNDS:
            bound = next(iter(ctx.values()), "?")
            reason = (
                f"expected a number {_BOUNDS[kind_]} {self.show(bound)}, got {self.show(value)}"
            )
        elif kind_ in ("too_short", "too_long") and isinstance(value, str):
            reason = f"expected {_length_wanted(kind_, ctx, 'character')}, got {self.show(value)}"
        elif kind_ == "string_too_short":
            reason = f"expected a non-empty string, got {self.show(value)}"
        elif kind_ == "too_short":
            got = "none" if not value else self.show(value)
            reason = f"expected {_length_wanted(kind_, ctx, 'entry')}, got {got}"
        elif kind_ == "value_error":
            reason = str(ctx.get("error", first["msg"]))
        elif kind_ in self.expected:
            reason = f"expected {self.expected[kind_]}, got {self.show(value)}"
        else:
            msg = first["msg"]
            reason = f"expected {msg[0].lower()}{msg[1:]}, got {self.show(value)}"
        return loc, reason


def dotted(path: Iterable[str | int]) -> str:
    """``["models", 2, "dest"]`` as ``models[2].dest``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def show(value: Any, *, width: int = 40) -> str:
    """``value`` as an error message shows it; strings longer than ``width`` are cut."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing (null)"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= width else repr(value[: width - 3] + "...")
    return kind(value)


def kind(value: Any) -> str:
    """What sort of value ``value`` is: ``a mapping``, ``a list``, or its type and value."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"{type(value).__name__} {value!r}"[:60]


def line_of(text: str, path: Sequence[str | int]) -> int | None:
    """The 1-based line of the deepest node of ``path`` found in the YAML, or None."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    line: int = node.start_mark.line + 1
    for part in path:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    # An unknown or missing-valued field is best shown at its key.
                    child, line = value, key.start_mark.line + 1
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _yaml_reason(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    problem = error.problem or error.context or "syntax error"
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"invalid YAML{where}: {problem}"


def _length_wanted(kind: str, ctx: Mapping[str, Any], unit: str) -> str:
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"at least {n} {unit}{'s' if n != 1 else ''}"
    n = ctx.get("max_length", 0)
    return f"at most {n} {unit}{'s' if n != 1 else ''}"


def _unknown_field(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"unknown field '{name}'; did you mean '{close[0]}'?"
    return f"unknown field '{name}'; expected one of: {', '.join(known)}"


def _fields_at(model: type[BaseModel], loc: list[str | int]) -> list[str]:
    """The fields of the model that holds the field at ``loc`` (its parent); none if unknown.

    List indices are stepped over, and so are the keys of a mapping of models
    (``profiles.sdxl``).
    """
    current = model
    key_next = False
    for part in loc[:-1]:
        if isinstance(part, int) or key_next:
            key_next = False
            continue
        info = current.model_fields.get(part)
        if info is None:
            return []
        inner = _model_in(info.annotation)
        if inner is None:
            return []
        current = inner
        key_next = get_origin(info.annotation) is dict
    return list(current.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None or get_args(annotation):
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
