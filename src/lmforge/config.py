"""The bridge between config dataclasses and YAML files / command-line flags.

A stage's Config is a (possibly nested) dataclass whose defaults work. Values are resolved in this order:
dataclass defaults -> preset (a field marked `preset_for`) -> `--config FILE.yaml` -> explicit flags.
Nested sections are addressed as `--section.key VALUE`; a field may also carry a short flag (`--max-steps`).
Unknown keys are errors, in YAML as on the command line. `to_dict`/`save_config` give the resolved config
that every run writes beside its outputs.

Field metadata understood here (set with `opt(...)`):
  help        text for --help (the default is appended: the value a bare `Config()` holds, so a section
              embedded with its own defaults, `opt(default_factory=lambda: Section(x=...))`, shows those)
  flag        extra short flag, e.g. "--max-steps" (how a nested section's field keeps a flat flag)
  positional  the field is a positional argument
  choices     allowed values (listed in --help as {a,b,c})
  preset_for  this str field names a preset applied to the sibling section it names; `presets` holds them
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import types
import typing
import weakref
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError


def opt(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
        positional: bool = False, choices: list | None = None, preset_for: str | None = None,
        presets: dict | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with the metadata the CLI needs."""
    meta = {"help": help, "flag": flag, "positional": positional, "choices": choices,
            "preset_for": preset_for, "presets": presets}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML or command-line value to the field's type, or raise a clear error."""
    inner, optional = _unwrap(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise LmforgeError(f"config key '{key}' cannot be empty")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if inner is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and ("e" in value.lower()) else int(value)
        if inner is float:
            return float(value)
        if inner is str:
            return str(value)
        if origin is list:
            (item_tp,) = typing.get_args(inner) or (str,)
            items = value if isinstance(value, list) else [value]
            return [_convert(v, item_tp, key) for v in items]
        if origin is dict or inner is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(value)
            return value
    except (TypeError, ValueError, json.JSONDecodeError):
        raise LmforgeError(f"config key '{key}': cannot read {value!r} as {getattr(inner, '__name__', inner)}") from None
    return value


def from_dict(cls: type, data: dict, base: Any = None, path: str = "") -> Any:
    """Build (or update `base`, a `cls` instance) from a nested dict; unknown keys are errors."""
    obj = base if base is not None else cls()
    if not isinstance(data, dict):
        raise LmforgeError(f"config section '{path or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        full = f"{path}{key}"
        if key not in names:
            raise LmforgeError(f"unknown config key '{full}'; valid keys here: {', '.join(sorted(names))}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            setattr(obj, key, from_dict(tp, value, getattr(obj, key), full + "."))
        else:
            setattr(obj, key, _convert(value, tp, full))
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"config file {p} must hold a mapping of keys to values")
    return data


def _walk(cls: type, prefix: str = ""):
    """Yield (dotted key, field, type) for every leaf field, depth first."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _get_dotted(obj: Any, key: str) -> Any:
    for p in key.split("."):
        obj = getattr(obj, p)
    return obj


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config values (flags override it)")
    groups: dict[str, Any] = {}
    # sections filled by a preset show that, not the dataclass default the preset replaces
    preset_sections = {(k.rsplit(".", 1)[0] + "." if "." in k else "") + f.metadata["preset_for"]: f"--{k}"
                       for k, f, _ in _walk(cls) if (f.metadata or {}).get("preset_for")}
    defaults = cls()  # a section's defaults are the embedding field's, not the section class's
    for key, f, tp in _walk(cls):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        group = parser
        if section:
            group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        meta = f.metadata or {}
        inner, _ = _unwrap(tp)
        default = _get_dotted(defaults, key)
        help_text = (meta.get("help") or "").replace("%", "%%")
        section_key = key.rsplit(".", 1)[0] if "." in key else ""
        if section_key in preset_sections:
            help_text += f" (default: from {preset_sections[section_key]})"
        elif not meta.get("positional"):
            help_text += f" (default: {default})" if default not in (None, "", []) else ""
        kwargs: dict[str, Any] = {"help": help_text, "dest": key}
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("positional"):
            kwargs.pop("dest")
            group.add_argument(key, nargs="?", metavar=key.rsplit(".", 1)[-1].upper(), **kwargs)
            continue
        # shown: the dashed form (and a short flag); accepted too but hidden: the field's own underscore name
        names = [meta["flag"]] if meta.get("flag") else []
        names.append("--" + key.replace("_", "-"))
        hidden = f"--{key}" if "_" in key else None
        names = list(dict.fromkeys(names))
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is list:
            kwargs["action"] = "append"
            kwargs["metavar"] = "VALUE"
        elif not meta.get("choices"):  # with choices, argparse shows them: {a,b,c}
            kwargs["metavar"] = getattr(inner, "__name__", "VALUE").upper() if inner in (int, float) else "VALUE"
        group.add_argument(*names, **kwargs)
        if hidden and hidden not in names:
            group.add_argument(hidden, **{**kwargs, "help": argparse.SUPPRESS})
    return parser


def _set_dotted(cfg: Any, cls: type, key: str, value: Any) -> None:
    parts = key.split(".")
    obj, owner = cfg, cls
    for p in parts[:-1]:
        obj, owner = getattr(obj, p), _hints(owner)[p]
    setattr(obj, parts[-1], _convert(value, _hints(owner)[parts[-1]], key))


def _apply_presets(cfg: Any, cls: type, chosen: dict[str, str]) -> None:
    for key, f, _tp in _walk(cls):
        meta = f.metadata or {}
        target = meta.get("preset_for")
        if not target:
            continue
        name = chosen.get(key, _default_of(f))
        if not name:
            continue
        presets = meta["presets"]
        if name not in presets:
            raise LmforgeError(f"unknown preset '{name}' for --{key}; choose one of: {', '.join(presets)}")
        section_path = key.rsplit(".", 1)[0] + "." + target if "." in key else target
        obj, owner = cfg, cls
        for p in section_path.split("."):
            obj, owner = getattr(obj, p), _hints(owner)[p]
        preset = presets[name]
        from_dict(owner, dataclasses.asdict(preset) if dataclasses.is_dataclass(preset) else dict(preset), obj)


def parse_config(cls: type, argv: list[str] | None = None, prog: str = "lmforge", description: str = "") -> Any:
    """Resolve a Config from defaults, preset, `--config` YAML and flags."""
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    yaml_data = load_yaml(args.pop("config")) if "config" in args else {}
    cfg = cls()
    preset_keys = {k for k, f, _ in _walk(cls) if (f.metadata or {}).get("preset_for")}
    chosen = {}
    for k in preset_keys:
        node: Any = yaml_data
        for p in k.split("."):
            node = node.get(p) if isinstance(node, dict) else None
        if node:
            chosen[k] = node
        if k in args:
            chosen[k] = args[k]
    _apply_presets(cfg, cls, chosen)
    from_dict(cls, yaml_data, cfg)
    for key, value in args.items():
        _set_dotted(cfg, cls, key, value)
    global _parsed
    _parsed = (weakref.ref(cfg), [*prog.split(), *(sys.argv[1:] if argv is None else argv)])
    return cfg


# ---- the command behind a result ------------------------------------------------------------------------
_parsed: tuple[Any, list[str]] | None = None  # (weak reference to the last parsed Config, the words it came from)


def command_line(cfg: Any = None, prog: str = "") -> str:
    """The command that produced a result, shell-quoted, for its report to name.

    The words the CLI parsed `cfg` from (cfg None: the config parsed last, while it is alive); for a config
    built in Python, `prog` followed by the flags of its non-default values (an equivalent command); without
    either, this process's own argv."""
    if _parsed is not None and _parsed[0]() is not None and (cfg is None or _parsed[0]() is cfg):
        return shlex.join(_parsed[1])
    if cfg is not None and prog:
        return shlex.join([*prog.split(), *_flags(cfg)])
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def _flags(cfg: Any) -> list[str]:
    """Flags that rebuild `cfg` from its class's defaults."""
    out: list[str] = []
    defaults = type(cfg)()
    for key, f, _tp in _walk(type(cfg)):
        meta = f.metadata or {}
        value, default = _get_dotted(cfg, key), _get_dotted(defaults, key)
        if value == default:
            continue
        name = meta.get("flag") or "--" + key.replace("_", "-")
        if meta.get("positional"):
            out.append(str(value))
        elif isinstance(value, bool):
            out.append(name if value else "--no-" + name[2:])
        elif isinstance(value, list):
            for v in value:
                out += [name, str(v)]
        else:
            out += [name, "none" if value is None else str(value)]
    return out
