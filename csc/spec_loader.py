"""Reading a spec: YAML, `--set` overrides, strict validation, and errors that say where the mistake is.

Every command reads its spec through `load_spec`. Unknown sections and fields are errors everywhere, with the
closest valid name; an invalid value set by `--set` is blamed on that `--set`, anything else on the file.

Override keys are dotted paths (`trainer.lr=1e-3`). Below a mapping field whose keys are free text (`sweep.search`,
`sweep.resources.producer_custom`), the rest of the key is one key, so `sweep.search.trainer.beta={type: choice,
values: [1, 2]}` sets the searched field `trainer.beta`, unless a start of the rest is a key there already:
`sweep.search.trainer.beta.high=5` changes the file's range of `trainer.beta`. A key in brackets is taken whole
anywhere: `sweep.search[trainer.beta].high=5`. Values are YAML (`[1, 2]`, `{a: 1}`, `null`).
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from csc.errors import SpecError
from csc.sae.archs import ARCHITECTURES

S = TypeVar("S", bound=BaseModel)

_KEY = re.compile(r"(?:[^.\[\]]+|\[[^\[\]]+\])(?:\.[^.\[\]]+|\[[^\[\]]+\])*")
_TOKEN = re.compile(r"\[([^\[\]]+)\]|([^.\[\]]+)")
_FIELD_FIRST = re.compile(r"^([\w.\[\]-]+): ")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load a YAML mapping, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec file ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _members(tp: Any) -> list[Any]:
    """The types a field annotation admits (Optional, Union and Annotated unwrapped)."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _members(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [m for a in get_args(tp) for m in _members(a)]
    return [tp]


def _child(tp: Any, name: str) -> Any | None:
    """The annotation of `name` inside a value of type `tp` (a field of a model, a mapping's value, or an SAE
    architecture's config named by its tag), or None when `tp` has no such part."""
    for t in _members(tp):
        if isinstance(t, type) and issubclass(t, BaseModel) and name in t.model_fields:
            return t.model_fields[name].annotation
        if get_origin(t) is dict:
            return get_args(t)[1]
    if name in ARCHITECTURES and any(isinstance(t, type) and issubclass(t, ARCHITECTURES[name].config_class)
                                     for t in _members(tp)):
        return ARCHITECTURES[name].config_class
    return None


def _is_mapping(tp: Any) -> bool:
    return any(get_origin(t) is dict for t in _members(tp))


def _fields(tp: Any) -> list[str]:
    """The valid names inside a value of type `tp`, for did-you-mean."""
    return [f for t in _members(tp) if isinstance(t, type) and issubclass(t, BaseModel) for f in t.model_fields]


def did_you_mean(name: str, valid: list[str]) -> str:
    """' (did you mean `x`?)' when one of `valid` is close to `name`, else ''."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def key_path(cls: type[BaseModel], key: str, data: dict[str, Any]) -> list[str]:
    """The parts of an override key (module docstring): dots split, brackets keep, and below a mapping whose keys
    are free text the rest of the key is one key, or the longest start of it that is a key there already in `data`
    (so `sweep.search.trainer.beta.high` reaches into the searched `trainer.beta` of the file)."""
    if not _KEY.fullmatch(key):
        raise ValueError("cannot read the key: write sections and fields with dots, and a key that holds dots in "
                         "brackets, e.g. sweep.search[trainer.beta].high=5")
    tokens = [(m.group(1), True) if m.group(1) is not None else (m.group(2), False) for m in _TOKEN.finditer(key)]
    parts: list[str] = []
    tp: Any = cls
    node: Any = data
    i = 0
    while i < len(tokens):
        name, bracketed = tokens[i]
        if tp is not None and _is_mapping(tp) and not bracketed:
            ends = [j for j in range(len(tokens), i, -1) if isinstance(node, dict)
                    and ".".join(t for t, _ in tokens[i:j]) in node and all(not b for _, b in tokens[i:j])]
            j = ends[0] if ends else len(tokens)
            name = ".".join(t for t, _ in tokens[i:j])
            i = j
        else:
            i += 1
        parts.append(name)
        tp = _child(tp, name) if tp is not None else None
        node = node.get(name) if isinstance(node, dict) else None
    return parts


def _set(data: dict[str, Any], parts: list[str], value: Any) -> list[str]:
    """Set the value at `parts`; returns the path of what the setting brought in (the first mapping it had to
    create, or the field itself), which errors found there are blamed on."""
    node, owned = data, parts
    for depth, part in enumerate(parts[:-1]):
        if part not in node and owned is parts:
            owned = parts[:depth + 1]
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[:depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    return owned


def _within(a: str, b: str) -> bool:
    """Whether dotted paths a and b are the same field or one holds the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _merged(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(under)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def load_spec(cls: type[S], path: str | Path | None, overrides: list[str] | None = None,
              part_of: type[BaseModel] | None = None, base: tuple[str, dict[str, Any]] | None = None) -> S:
    """Read YAML at `path` (or nothing: all defaults), apply `key.sub=value` overrides, validate as `cls`.

    `part_of`: the larger spec `cls` is a part of (a command that needs only some sections, such as `csc train` on
    a sweep spec): its other sections are validated as `part_of` declares them, then left out. Any other unknown
    section is an error.
    `base`: (what it is, data) under the file's: each field the file or a `--set` gives replaces base's.
    """
    origin = str(path) if path is not None else base[0] if base is not None else "no spec file"
    data = read_yaml(path) if path is not None else {}
    if base is not None:
        data = _merged(base[1], data)
    whole = part_of or cls
    setters: list[tuple[str, str]] = []  # (dotted path, the --set as given)
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise SpecError(f"--set {item}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        try:
            owned = _set(data, key_path(whole, key.strip(), data), value)
        except ValueError as e:
            raise SpecError(f"--set {item}: {e}") from None
        setters.append((".".join(owned), item))

    def blame(where: str) -> str:
        return next((f"--set {item}" for dotted, item in reversed(setters) if where and _within(where, dotted)),
                    origin)

    lines = [f"{blame(str(k))}: {_shown(str(k))}: unknown field{did_you_mean(str(k), list(whole.model_fields))}"
             for k in data if k not in whole.model_fields]
    for name in [k for k in data if k not in cls.model_fields and k in whole.model_fields]:
        field = whole.model_fields[name]
        try:
            TypeAdapter(Annotated[field.annotation, field]).validate_python(data.pop(name))
        except ValidationError as e:
            lines += _messages(e, field.annotation, blame, prefix=[name])
    if lines:
        raise SpecError("\n".join(lines))
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise SpecError("\n".join(_messages(e, cls, blame))) from None


def _shown(key: str) -> str:
    """Keys are the user's text: one with a newline or tab in it is shown quoted."""
    return key if key.isprintable() else repr(key)


def _messages(e: ValidationError, tp: Any, blame: Callable[[str], str], prefix: list[str] | None = None) -> list[str]:
    """One line per error: who set it (blame of its dotted path), the path, the message; did-you-mean for unknown
    fields. `tp` is the type validated, `prefix` its path in the spec."""
    lines = []
    for err in e.errors():
        raw = [*(prefix or []), *(str(p) for p in err["loc"])]
        # the union's tag: the field is sae.<field> whatever the architecture
        parts = [p for i, p in enumerate(raw) if not (i == 1 and raw[0] == "sae" and p in ARCHITECTURES)]
        loc = ".".join(_shown(p) for p in parts)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            below = _child(tp, raw[-1]) if len(raw) == 1 else None  # a missing section: what it needs
            needed = [f"{loc}.{n}" for t in _members(below) if isinstance(t, type) and issubclass(t, BaseModel)
                      for n, f in t.model_fields.items() if f.is_required()][:1] or [loc]
            msg = f"required (give it in the spec file, or with --set {needed[0]}=...)"
        if err["type"] == "extra_forbidden":
            parent: Any = tp
            for p in raw[len(prefix or []):-1]:
                parent = _child(parent, p) if parent is not None else None
            msg = "unknown field" + (did_you_mean(raw[-1], _fields(parent)) if parent is not None else "")
        if loc:
            lines.append(f"{blame(loc)}: {loc}: {msg}")
        else:
            # Whole-spec checks put the field they are about at the start of their message.
            m = _FIELD_FIRST.match(msg)
            lines.append(f"{blame(m.group(1) if m else '')}: {msg}")
    return lines
