"""The price table: API models' per-token prices and GPUs' specs and hourly prices, read from prices.yaml.

prices.yaml ships inside the package; `--prices FILE.yaml` extends or overrides it. A user entry with a known name
is merged field by field, so a file holding only `gpus: {h100: {usd_per_hour: 2.10}}` changes one price. Figures a
user file sets without its own `source` are credited to that file. Names match case-insensitively and through each
entry's `aliases` ("a100" is the 80 GB SXM part). Unknown names and malformed figures raise LmforgeError listing
what is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class ApiModel:
    """An API model's list price, in US dollars per 1M tokens."""

    name: str
    input_usd_per_1m: float
    output_usd_per_1m: float
    provider: str = ""
    date: str = ""
    source: str = ""
    note: str = ""


@dataclass(frozen=True)
class Gpu:
    """One accelerator: dense bf16 peak, memory, bandwidth and the on-demand price of one of it."""

    key: str
    name: str
    bf16_tflops: float
    memory_gb: float
    bandwidth_gb_s: float
    usd_per_hour: float
    date: str = ""
    spec_source: str = ""
    price_source: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def bandwidth_bytes_s(self) -> float:
        return self.bandwidth_gb_s * 1e9


@dataclass
class PriceTable:
    api_models: dict[str, ApiModel] = field(default_factory=dict)
    gpus: dict[str, Gpu] = field(default_factory=dict)
    date: str = ""
    files: list[str] = field(default_factory=list)

    def has_model(self, name: str) -> bool:
        return name.lower() in self.api_models

    def model(self, name: str) -> ApiModel:
        key = name.lower()
        if key not in self.api_models:
            raise LmforgeError(f"no API model named '{name}' in the price table; known: {', '.join(self.api_models)}. "
                               "Add it with --prices FILE.yaml (api_models: {NAME: {input_usd_per_1m: ..., "
                               "output_usd_per_1m: ...}})")
        return self.api_models[key]

    def gpu(self, name: str) -> Gpu:
        key = name.lower()
        for gpu in self.gpus.values():
            if key == gpu.key or key in gpu.aliases:
                return gpu
        raise LmforgeError(f"no GPU named '{name}' in the price table; known: {', '.join(self.gpus)}. "
                           "Add it with --prices FILE.yaml (gpus: {NAME: {bf16_tflops: ..., memory_gb: ..., "
                           "bandwidth_gb_s: ..., usd_per_hour: ...}})")


_MODEL_FIGURES = ("input_usd_per_1m", "output_usd_per_1m")
_GPU_FIGURES = ("bf16_tflops", "memory_gb", "bandwidth_gb_s", "usd_per_hour")


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise LmforgeError(f"{where} must be a non-negative number, got {value!r}")
    return float(value)


def _read(text: str, origin: str) -> dict:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"price file {origin} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"price file {origin} must be a mapping with api_models: and/or gpus:")
    unknown = set(data) - {"version", "date", "api_models", "gpus"}
    if unknown:
        raise LmforgeError(f"price file {origin}: unknown top-level keys {sorted(unknown)}; use api_models: and gpus:")
    for section in ("api_models", "gpus"):
        if not isinstance(data.get(section) or {}, dict):
            raise LmforgeError(f"price file {origin}: '{section}' must map names to entries")
    return data


def _merge_model(name: str, entry: dict, old: dict | None, origin: str) -> dict:
    if not isinstance(entry, dict):
        raise LmforgeError(f"price file {origin}: api_models.{name} must be a mapping")
    entry = dict(entry)
    for side in ("input", "output"):  # per-1K prices are how most pages quote them; store per 1M
        k1k = f"{side}_usd_per_1k"
        if k1k in entry:
            entry[f"{side}_usd_per_1m"] = _number(entry.pop(k1k), f"{origin}: api_models.{name}.{k1k}") * 1000
    allowed = {*_MODEL_FIGURES, "provider", "date", "source", "note"}
    if set(entry) - allowed:
        raise LmforgeError(f"price file {origin}: api_models.{name} has unknown keys {sorted(set(entry) - allowed)}; "
                           f"allowed: {sorted(allowed | {'input_usd_per_1k', 'output_usd_per_1k'})}")
    merged = dict(old or {})
    if any(k in entry for k in _MODEL_FIGURES) and "source" not in entry:
        entry["source"] = f"your price file {origin}"
    merged.update(entry)
    for k in _MODEL_FIGURES:
        if k not in merged:
            raise LmforgeError(f"price file {origin}: api_models.{name} needs {k} (or {k.replace('1m', '1k')})")
        merged[k] = _number(merged[k], f"{origin}: api_models.{name}.{k}")
    return merged


def _merge_gpu(name: str, entry: dict, old: dict | None, origin: str) -> dict:
    if not isinstance(entry, dict):
        raise LmforgeError(f"price file {origin}: gpus.{name} must be a mapping")
    allowed = {*_GPU_FIGURES, "name", "aliases", "date", "spec_source", "price_source"}
    if set(entry) - allowed:
        raise LmforgeError(f"price file {origin}: gpus.{name} has unknown keys {sorted(set(entry) - allowed)}; "
                           f"allowed: {sorted(allowed)}")
    entry = dict(entry)
    if "usd_per_hour" in entry and "price_source" not in entry:
        entry["price_source"] = f"your price file {origin}"
    if any(k in entry for k in _GPU_FIGURES[:3]) and "spec_source" not in entry:
        entry["spec_source"] = f"your price file {origin}"
    merged = dict(old or {})
    merged.update(entry)
    for k in _GPU_FIGURES:
        if k not in merged:
            raise LmforgeError(f"price file {origin}: gpus.{name} needs {k}")
        merged[k] = _number(merged[k], f"{origin}: gpus.{name}.{k}")
    aliases = merged.get("aliases") or []
    if not isinstance(aliases, list):
        raise LmforgeError(f"price file {origin}: gpus.{name}.aliases must be a list of names")
    merged["aliases"] = [str(a).lower() for a in aliases]
    return merged


def load_prices(extra: str | Path | None = None) -> PriceTable:
    """The shipped table, then `extra` (a user's YAML file) merged over it."""
    sources = [(resources.files("lmforge.plan").joinpath("prices.yaml").read_text(), "prices.yaml (shipped)")]
    if extra:
        p = Path(extra)
        if not p.is_file():
            raise LmforgeError(f"price file {p} does not exist; give a YAML file with api_models: and/or gpus:")
        sources.append((p.read_text(), str(p)))
    models: dict[str, dict] = {}
    gpus: dict[str, dict] = {}
    date = ""
    for text, origin in sources:
        data = _read(text, origin)
        date = str(data.get("date", date))
        for name, entry in (data.get("api_models") or {}).items():
            key = str(name).lower()
            models[key] = _merge_model(key, entry, models.get(key), origin)
        for name, entry in (data.get("gpus") or {}).items():
            key = str(name).lower()
            gpus[key] = _merge_gpu(key, entry, gpus.get(key), origin)
    table = PriceTable(date=date, files=[o for _, o in sources])
    for key, m in models.items():
        table.api_models[key] = ApiModel(name=key, **{k: (str(v) if k in ("date", "provider", "source", "note") else v)
                                                     for k, v in m.items()})
    for key, g in gpus.items():
        g = dict(g)
        aliases = tuple(g.pop("aliases"))
        table.gpus[key] = Gpu(key=key, name=str(g.pop("name", key)), aliases=aliases,
                              **{k: (str(v) if k in ("date", "spec_source", "price_source") else v) for k, v in g.items()})
    return table
