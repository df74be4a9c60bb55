"""Nested settings with flat names: the machinery under RunConfig, free of what the settings mean,
and the check of the one kind of name a setting gives the file system (run ids).

A configuration is a dataclass of *sections*, each a dataclass of settings, and a section may hold
a further dataclass (ZeRO's knobs, the perturbation modes' options). Every leaf has one *flat name*,
unique across the configuration: the name of its flag, of its key in config.json and in sweep
files. A leaf's flat name is its field name unless its metadata gives `flat`; its documentation is
the docstring written under it; a `Literal` type is its closed set of choices.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass

from cwa_dist.errors import UsageError


def setting(default=dataclasses.MISSING, *, flag: str | None = None, operational: bool = False,
            flat: str | None = None):
    """A field of a section. `flag` overrides --flat-name; an `operational` setting changes how a run
    is carried out, not what it computes, so a resume may change it; on a nested section,
    `operational` holds for every leaf inside."""
    meta = {"flag": flag, "operational": operational, "flat": flat}
    if isinstance(default, type):  # a nested section: each instance gets its own
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Leaf:
    """One setting: where it lives (`path` of field names from the top) and what the user calls it."""

    flat: str
    path: tuple[str, ...]
    hint: typing.Any
    default: typing.Any  # dataclasses.MISSING when required
    operational: bool
    flag: str
    doc: str

    @property
    def section(self) -> str:
        return self.path[0]

    @property
    def choices(self) -> tuple | None:
        return typing.get_args(self.hint) if typing.get_origin(self.hint) is typing.Literal else None


def _is_section(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


@functools.cache
def leaves(cls: type) -> tuple[Leaf, ...]:
    """Every setting under `cls`, in declaration order; flat names checked to be unique."""
    out = list(_walk(cls, (), operational=False))
    seen = [leaf.flat for leaf in out]
    dupes = {n for n in seen if seen.count(n) > 1}
    if dupes:
        raise TypeError(f"{cls.__name__}: flat names used twice: {sorted(dupes)}")
    return tuple(out)


def _walk(cls: type, path: tuple[str, ...], operational: bool) -> Iterator[Leaf]:
    hints, docs = typing.get_type_hints(cls, include_extras=True), _docstrings(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("setting", True) is False:
            continue
        hint, here = hints[f.name], operational or f.metadata.get("operational", False)
        if _is_section(hint):
            yield from _walk(hint, (*path, f.name), here)
            continue
        flat = f.metadata.get("flat") or f.name
        yield Leaf(flat=flat, path=(*path, f.name), hint=hint, default=f.default, operational=here,
                   flag=f.metadata.get("flag") or "--" + flat.replace("_", "-"), doc=docs.get(f.name, ""))


def _docstrings(cls: type) -> dict[str, str]:
    """Each field's docstring, read from the class's source (documentation written once, beside it)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def flatten(obj) -> dict:
    """{flat name: value} of every setting of `obj`."""
    out = {}
    for leaf in leaves(type(obj)):
        value = obj
        for name in leaf.path:
            value = getattr(value, name)
        out[leaf.flat] = value
    return out


def build(cls: type, flat: dict, where: str | None = None):
    """`cls` from flat values; every setting not given keeps its default. With `where` (a sweep
    file's entry), each key is checked and each value's type coerced, so a typo is named with the
    closest setting instead of being ignored."""
    by_name = {leaf.flat: leaf for leaf in leaves(cls)}
    nested: dict = {}
    for key, value in flat.items():
        leaf = by_name.get(key)
        if leaf is None:
            close = difflib.get_close_matches(str(key), list(by_name), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"{where or 'settings'}: unknown setting {key!r}.{hint}")
        if where is not None:
            value = coerce(leaf.hint, value, f"{where}: {key}")
        place = nested
        for name in leaf.path[:-1]:
            place = place.setdefault(name, {})
        place[leaf.path[-1]] = value
    return _construct(cls, nested)


def _construct(cls: type, values: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {name: _construct(hints[name], v) if isinstance(v, dict) and _is_section(hints[name]) else v
              for name, v in values.items()}
    return cls(**kwargs)


def coerce(hint, value, where: str):
    """`value` (plain data from YAML or JSON) as `hint` asks, or a UsageError naming `where`."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:  # tuple[X, ...]: a list, or one value
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(coerce(args[0], v, where) for v in items)
    if type(None) in args:  # X | None
        return None if value is None else coerce(next(a for a in args if a is not type(None)), value, where)
    if origin is typing.Literal:
        return value  # the section checks it against its choices
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        raise UsageError(f"{where} should be {hint.__name__}, not {value!r}")
    return float(value) if hint is float else value


def check_choices(section) -> None:
    """Each `Literal` field of `section` itself (not of a section inside it) holds one of its choices."""
    for leaf in leaves(type(section)):
        if leaf.choices is not None and len(leaf.path) == 1:
            value = getattr(section, leaf.path[0])
            if value not in leaf.choices:
                raise UsageError(f"{leaf.flag} {value!r} is not one of {', '.join(map(str, leaf.choices))}")


def positive(flag: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        raise UsageError(f"{flag} {value} is too small; it must be at least {minimum}")


def non_negative(flag: str, value: int) -> None:
    if value < 0:
        raise UsageError(f"{flag} {value} is negative")


_RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def path_component(name: str) -> str:
    """`name` made into one safe path component (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def check_run_id(value: str, what: str) -> None:
    """A run (or sweep) id names one directory under --output: one path component of letters,
    digits, '.', '_' and '-', and not '.' or '..', so it can never point outside --output."""
    if not _RUN_ID.fullmatch(value) or value in (".", ".."):
        raise UsageError(f"{what} {value!r} must be one path component of letters, digits, '.', '_' and '-'")
