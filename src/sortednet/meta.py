"""The JSON description in a checkpoint: its schema, checked field by field.

Format ``sortednet/2`` (written by :func:`sortednet.save`)::

    {"format": "sortednet/2",
     "dims": [{"kind": "width", "name": "ffn", "sizes": [..], "out": [exact module paths], ...,
               "patterns": {"out": [patterns as written]}}],     # patterns: information only
     "submodels": null | [[size per dim], ...],                # null: the full product
     "count": N, "extra": {"profile": {...}}, "checksum": "crc32+header", "crc32": {tensor: "8 hex"}}

``sortednet/1`` files (patterns as written, every sub-model listed by name, no
checksum) are read when every pattern is an exact module path; a pattern
(glob or ``re:``) from a file is never matched. Every read is bounded: the
number of dimensions, sizes, paths and sub-models, and the header itself.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .checkpoint import Container, parse_json
from .dims import _KINDS, Dimension
from .errors import SortedNetError, nearby
from .patterns import match
from .submodel import MAX_SUBMODELS, SubModel

__all__ = ["FORMAT", "FORMATS", "CHECKSUM", "EXTRA_PREFIX", "read_meta", "exact_spec", "rows_of", "calibration_entries",
           "check_stale_marks", "check_profile", "PATTERN_FIELDS", "INFO_FIELDS"]

FORMAT = "sortednet/2"
FORMATS = ("sortednet/1", FORMAT)
#: ``checksum`` written since the header has its own CRC-32 (files saying ``"crc32"`` check the tensors only)
CHECKSUM = "crc32+header"
#: tensors stored beside the weights (e.g. calibrated BatchNorm statistics) live under this key prefix
EXTRA_PREFIX = "_sortednet/"
#: spec keys of each built-in dimension kind that hold module patterns
PATTERN_FIELDS = {"width": ("out", "inp", "norm"), "depth": ("layers",), "heads": ("attn",), "rank": ("targets",)}
#: spec keys that describe, not bind: ``load`` leaves them out when comparing a file's dimensions with the nest's
INFO_FIELDS = {"heads": ("whole",)}
MAX_DIMS, MAX_SIZES, MAX_SIZE = 4096, 65536, 2 ** 31  # (bounds a file may not exceed: save refuses more)
METRICS = ("params", "flops", "latency", "memory")
_KEYS = {FORMATS[0]: {"format", "dims", "submodels", "extra"},
         FORMAT: {"format", "dims", "submodels", "count", "extra", "checksum", "crc32", "ties"}}
_OPTIONAL = {"extra", "ties"}  # ("ties": the names a stored tensor was tied to, written since 0.1)


#: what a subclass of a built-in kind may define and still be that kind (its own __init__: preset patterns)
_PLAIN = {"__init__", "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
          "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__", "__annotate__"}


def exact_spec(d: Dimension, modules: Mapping[str, Any]) -> dict[str, Any]:
    """``d.spec()`` with each pattern field replaced by the exact module paths it matches
    (the user's patterns kept under ``"patterns"`` for information)."""
    spec = d.spec()
    fields = PATTERN_FIELDS.get(d.kind)
    base = _KINDS.get(d.kind)
    # a subclass of a built-in kind (a helper presetting its patterns) binds and describes itself as the
    # built-in does, so the built-in rebuilt from the file is the same dimension; one that plans or describes
    # itself otherwise keeps its patterns as written (loaded into a nest it was wrapped with, not rebuilt)
    if fields is None or base is None or not isinstance(d, base) or any(
            k not in _PLAIN for c in type(d).__mro__[:type(d).__mro__.index(base)] for k in vars(c)):
        return spec
    spec["patterns"] = {f: spec[f] for f in fields}
    for f in fields:
        spec[f] = list(dict.fromkeys(p for pat in spec[f] for p in match(pat, dict(modules), f"{d.name} {f}")))
    if spec.get("chunks"):
        ch: dict[str, int] = {}
        for pat, n in spec["chunks"].items():
            for p in match(pat, dict(modules), f"{d.name} chunks"):
                ch.setdefault(p, n)
        spec["chunks"] = ch
    return spec


def _err(where: str, msg: str) -> SortedNetError:
    return SortedNetError(f"checkpoint {where}: {msg}")


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(type(x) is int for x in v)


def read_meta(f: Container) -> dict[str, Any]:
    """The checked description of ``f``; adds ``dims_built(modules)`` (the dimensions, built from
    exact paths for a fresh model), ``rows`` (see :func:`rows_of`) and ``crc32`` (None for format 1)."""
    where = repr(f.path)
    raw = f.metadata.get("sortednet")
    if raw is None:
        raise SortedNetError(f"{f.path!r} is a safetensors file without sortednet metadata")
    meta = parse_json(raw, f"checkpoint {where} metadata")
    if not isinstance(meta, dict):
        raise _err(where, f"metadata is a JSON {type(meta).__name__}, expected an object")
    fmt = meta.get("format")
    if fmt not in FORMATS:
        raise SortedNetError(f"{f.path!r} has format {str(fmt)[:40]!r}; this version reads {list(FORMATS)}")
    unknown = sorted(set(meta) - _KEYS[fmt])
    missing = sorted(_KEYS[fmt] - _OPTIONAL - set(meta))
    if unknown or missing:
        raise _err(where, f"metadata has unknown keys {unknown[:5]} / lacks {missing} (format {fmt})")
    dims = meta["dims"]
    if not isinstance(dims, list) or not 0 <= len(dims) <= MAX_DIMS:  # (none: a nest wrapped without one)
        raise _err(where, f"'dims' must be a list of 0..{MAX_DIMS} dimension specs, got {str(dims)[:80]}")
    seen: set[str] = set()
    for i, spec in enumerate(dims):
        _check_spec(spec, i, fmt, where)
        if spec["name"] in seen:
            raise _err(where, f"two dimensions are named {spec['name']!r}")
        seen.add(spec["name"])
    extra = meta.get("extra")
    if extra is None:
        extra = meta["extra"] = {}
    if not isinstance(extra, dict) or set(extra) - {"profile", "profile_structure", "scores_stale",
                                                    "calibration_stale"}:
        raise _err(where, f"'extra' must be an object with at most a 'profile', 'profile_structure', 'scores_stale' "
                          f"and 'calibration_stale', got {str(extra)[:80]}")
    mark = extra.get("profile_structure")
    if mark is not None and (not isinstance(extra.get("profile"), dict) or not isinstance(mark, str)
                             or len(mark) != 64 or set(mark) - set("0123456789abcdef")):
        raise _err(where, f"'profile_structure' must be a SHA-256 hex digest beside a profile, got {str(mark)[:80]}")
    ties = meta.setdefault("ties", [])
    if not isinstance(ties, list) or not all(
            isinstance(g, list) and len(g) > 1 and all(isinstance(k, str) for k in g)
            and g[0] in f.entries and not any(k in f.entries for k in g[1:]) for g in ties):
        raise _err(where, f"'ties' must list groups of names, the first stored, the others not, got {str(ties)[:80]}")
    meta["crc32"] = _crcs(meta, f, where) if fmt == FORMAT else None
    meta["rows"] = _rows(meta, where)
    meta["dims_built"] = lambda modules: _build(meta, modules, where)
    return meta


def _check_spec(spec: Any, i: int, fmt: str, where: str) -> None:
    if not isinstance(spec, dict):
        raise _err(where, f"dimension #{i} is a JSON {type(spec).__name__}, expected an object")
    kind, name, sizes = spec.get("kind"), spec.get("name"), spec.get("sizes")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise _err(where, f"dimension #{i} has unknown kind {str(kind)[:40]!r}; known: {sorted(_KINDS)}")
    if not isinstance(name, str) or not name.isidentifier() or len(name) > 200:
        raise _err(where, f"dimension #{i} name {str(name)[:40]!r} is not an identifier")
    if not _ints(sizes) or not 1 <= len(sizes) <= MAX_SIZES or not all(0 < s < MAX_SIZE for s in sizes) \
            or any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise _err(where, f"dimension {name!r} sizes {str(sizes)[:80]} are not 1..{MAX_SIZES} ascending "
                          "positive ints")
    # (a kind of the user's own is never rebuilt from a file, only compared with the nest's own dimension)
    allowed = {p.name for p in inspect.signature(_KINDS[kind].__init__).parameters.values()
               if p.kind == p.KEYWORD_ONLY}
    unknown = sorted(set(spec) - allowed - {"kind", "name", "sizes", "patterns"}) if kind in PATTERN_FIELDS else []
    if unknown:
        raise _err(where, f"dimension {name!r} ({kind}) has unknown keys {unknown[:5]}; "
                          f"{kind} takes {sorted(allowed)}")
    for field in PATTERN_FIELDS.get(kind, ()):
        v = spec.get(field)
        if not isinstance(v, list) or not all(isinstance(p, str) and len(p) <= 1000 for p in v):
            raise _err(where, f"dimension {name!r} {field!r} must be a list of module paths, got {str(v)[:80]}")
    if "patterns" in spec and (fmt != FORMAT or not isinstance(spec["patterns"], dict)):
        raise _err(where, f"dimension {name!r}: 'patterns' must be an object (format 2 only)")


def _crcs(meta: dict[str, Any], f: Container, where: str) -> dict[str, str]:
    crcs = meta["crc32"]
    if meta["checksum"] not in ("crc32", CHECKSUM) or not isinstance(crcs, dict):
        raise _err(where, f"checksum {str(meta['checksum'])[:40]!r} / 'crc32' table is not understood")
    bad = [k for k, v in crcs.items() if not (isinstance(v, str) and len(v) == 8 and
                                              all(c in "0123456789abcdef" for c in v))]
    if bad or set(crcs) != set(f.entries):
        extra, lacking = sorted(set(crcs) - set(f.entries)), sorted(set(f.entries) - set(crcs))
        raise _err(where, f"checksum table does not match the tensors: malformed {bad[:3]}, for absent tensors "
                          f"{extra[:3]}, missing for {lacking[:3]}")
    return crcs


def _rows(meta: dict[str, Any], where: str) -> list[tuple[int, ...]] | None:
    dims, subs = meta["dims"], meta["submodels"]
    names = [d["name"] for d in dims]
    total = math.prod(len(d["sizes"]) for d in dims)
    if subs is None and meta["format"] == FORMAT:
        rows = None
    elif not isinstance(subs, list) or not 1 <= len(subs) <= MAX_SUBMODELS:
        raise _err(where, f"'submodels' must be null or a list of 1..{MAX_SUBMODELS:,} sub-models")
    else:
        sizes = [set(d["sizes"]) for d in dims]
        out = set()
        for s in subs:
            if meta["format"] == FORMAT:
                if not _ints(s) or len(s) != len(dims):
                    raise _err(where, f"sub-model {str(s)[:80]} is not a list of {len(dims)} ints")
                row = tuple(s)
            else:
                if not isinstance(s, str) or len(s) > 10_000:
                    raise _err(where, f"sub-model {str(s)[:80]!r} is not a 'name=size,...' string")
                try:
                    sub = SubModel.parse(s)
                except SortedNetError as e:
                    raise _err(where, str(e)) from None
                if set(sub) != set(names):
                    raise _err(where, f"sub-model {s[:80]!r} does not name the dimensions {names}")
                row = tuple(sub[n] for n in names)
            bad = next((n for n, v, ok in zip(names, row, sizes) if v not in ok), None)
            if bad is not None:
                raise _err(where, f"sub-model {dict(zip(names, row))} has a size of {bad!r} not in its sizes")
            out.add(row)
        rows = None if meta["format"] != FORMAT and len(out) == total else sorted(out)
    count = total if rows is None else len(rows)
    if meta["format"] == FORMAT and (type(meta["count"]) is not int or meta["count"] != count):
        raise _err(where, f"'count' {repr(meta['count'])[:40]} does not match the {count:,} sub-models described")
    if rows is None and total > MAX_SUBMODELS:
        raise _err(where, f"{total:,} sub-models exceed the limit of {MAX_SUBMODELS:,}")
    return rows


def rows_of(meta: dict[str, Any], where: str) -> list[tuple[int, ...]] | None:
    """The listed sub-models as size tuples (dimension order), or None for the full product."""
    return meta["rows"]


def _build(meta: dict[str, Any], modules: Mapping[str, Any], where: str) -> list[Dimension]:
    dims = []
    for spec in meta["dims"]:
        kind, name = spec["kind"], spec["name"]
        fields = PATTERN_FIELDS.get(kind)
        if fields is None:
            raise _err(where, f"dimension {name!r} of kind {kind!r} cannot be rebuilt from a file safely; wrap the "
                              "model yourself with the same dimensions and load into the nest: sn.load(nest, path)")
        for field in fields:
            for p in spec[field]:
                if p not in modules or p.startswith("re:") or "*" in p:
                    hint = ("format 1 stored it as written; only exact module paths are read from a file. Wrap the "
                            "model yourself with the same dimensions and load into the nest: sn.load(nest, path)"
                            ) if meta["format"] != FORMAT else f"nearby names: {nearby(p, [n for n in modules if n])}"
                    raise _err(where, f"dimension {name!r} {field}= names {p[:200]!r}, which is not a module path "
                                      f"of this model; {hint}")
        kw = {k: v for k, v in spec.items() if k not in ("kind", "name", "sizes", "patterns")}
        try:
            dims.append(_KINDS[kind](name, spec["sizes"], **kw))
        except SortedNetError as e:
            raise _err(where, f"dimension {name!r}: {e}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise _err(where, f"dimension {name!r} has malformed options: {e}") from None
    return dims


def calibration_entries(f: Container, keys: list[str], planned: Mapping[str, tuple], meta: dict[str, Any],
                        rows: list[tuple[int, ...]] | None, where: str) -> list[str]:
    """Check the calibration tensors (names, sub-models, shapes, dtypes) against the planned BatchNorms."""
    bns = {p: (m, bind) for p, (m, _, bind) in planned.items()
           if isinstance(m, _BatchNorm) and "norm" in bind and m.__dict__.get("track_running_stats")}
    names = [d["name"] for d in meta["dims"]]
    sizes = [set(d["sizes"]) for d in meta["dims"]]
    full = tuple(max(ok) for ok in sizes)  # (a restricted nest's full model, which runs outside use, is calibrated too)
    listed = None if rows is None else {*rows, full}
    prefix = f"{EXTRA_PREFIX}bn/"
    pairs: dict[tuple, set[str]] = {}
    counts: set[tuple] = set()
    for k in keys:
        if not k.startswith(prefix) or k.count("/") < 4:
            raise _err(where, f"unknown reserved tensor {k[:200]!r}")
        sub_text, rest = k[len(prefix):].split("/", 1)
        path, stat = rest.rsplit("/", 1)
        try:
            sub = SubModel.parse(sub_text)
        except SortedNetError:
            raise _err(where, f"calibration tensor {k[:200]!r} names no sub-model") from None
        row = tuple(sub.get(n) for n in names)
        if set(sub) != set(names) or any(v not in ok for v, ok in zip(row, sizes)) or \
                (listed is not None and row not in listed):
            raise _err(where, f"calibration tensor {k[:200]!r} is for {sub_text[:100]!r}, not a sub-model of this nest")
        if path not in bns or stat not in ("running_mean", "running_var", "num_batches_tracked"):
            raise _err(where, f"calibration for {path[:200]!r}.{stat[:40]}, which is not a sliced BatchNorm "
                              f"statistic of this nest (sliced BatchNorm: {sorted(bns)[:8]})")
        m, bind = bns[path]
        if stat == "num_batches_tracked":  # the number of batches the statistics average
            e = f.entries[k]
            if e.shape != () or e.dtype != torch.long:
                raise _err(where, f"calibration tensor {k[:200]!r} is {e.dtype}{list(e.shape)}; a batch count is "
                                  "torch.int64[]")
            counts.add((row, path))
            continue
        b = bind["norm"]
        size = row[names.index(b.dim.name)]
        n = b.total(size) if hasattr(b, "total") else b.features(size) * b.chunks
        buf = m.__dict__["_buffers"][stat]
        e = f.entries[k]
        if e.shape != (n,) or e.dtype != buf.dtype:
            raise _err(where, f"calibration tensor {k[:200]!r} is {e.dtype}{list(e.shape)}; {path!r} at "
                              f"{b.dim.name}={size} needs {buf.dtype}[{n}]")
        pairs.setdefault((row, path), set()).add(stat)
    half = next((k for k, v in pairs.items() if len(v) != 2), None)  # (mean and variance, the count optional)
    half = half or next((k for k in counts if k not in pairs), None)
    if half is not None:
        have = sorted(pairs.get(half, {"num_batches_tracked"}))
        raise _err(where, f"calibration of {half[1]!r} for {dict(zip(names, half[0]))} has only {have}")
    return keys


def _numbers(v: Any, n: int, what: str, where: str, *, negative: bool = False) -> None:
    if not isinstance(v, list) or len(v) != n:
        raise _err(where, f"profile {what} must be a list of {n} numbers, got {str(v)[:80]}")
    for x in v:
        if type(x) is int and abs(x) > 2**63:  # beyond any cost; float(x) would overflow
            raise _err(where, f"profile {what} holds an integer of {len(str(abs(x)))} digits; expected finite numbers")
        if type(x) not in (int, float) or not math.isfinite(x) or (x < 0 and not negative):
            raise _err(where, f"profile {what} holds {x!r}; expected finite"
                              + ("" if negative else ", non-negative") + " numbers")


def check_stale_marks(extra: dict[str, Any], calib: list[str], where: str) -> None:
    """Check the marks of what was out of date when saved: ``scores_stale`` true (with a profile holding scores),
    ``calibration_stale`` mapping a BatchNorm path to sub-models whose calibration tensors the file holds."""
    if "scores_stale" in extra and (extra["scores_stale"] is not True or not isinstance(extra.get("profile"), dict)
                                    or extra["profile"].get("scores") is None):
        raise _err(where, f"'scores_stale' must be true, beside a profile with scores, got {extra['scores_stale']!r}")
    marks = extra.get("calibration_stale", {})
    have = set(calib)
    if not isinstance(marks, dict) or not all(isinstance(p, str) and isinstance(v, list) and v and all(
            isinstance(t, str) and f"{EXTRA_PREFIX}bn/{t}/{p}/running_mean" in have for t in v)
            for p, v in marks.items()):
        raise _err(where, f"'calibration_stale' must map BatchNorm paths to sub-models whose calibration the file "
                          f"holds, got {str(marks)[:120]}")


def check_profile(d: Any, meta: dict[str, Any], rows: list[tuple[int, ...]] | None, where: str) -> None:
    """Check a stored profile: its sub-models are the nest's, costs finite and non-negative, lengths agree."""
    if d is None:
        return
    if not isinstance(d, dict) or not {"submodels", "costs"} <= set(d) or \
            set(d) - {"submodels", "costs", "scores", "device", "meta"}:
        raise _err(where, f"profile must be an object with submodels, costs (and scores, device, meta), "
                          f"got keys {sorted(d)[:8] if isinstance(d, dict) else type(d).__name__}")
    subs, names = d["submodels"], [s["name"] for s in meta["dims"]]
    if not isinstance(subs, list) or not subs:
        raise _err(where, "profile submodels must be a non-empty list")
    listed = None if rows is None else set(rows)
    sizes = [set(s["sizes"]) for s in meta["dims"]]
    seen = set()
    for s in subs:
        if not isinstance(s, dict) or set(s) != set(names) or not all(type(v) is int for v in s.values()):
            raise _err(where, f"profile sub-model {str(s)[:80]} does not give an int size for each of {names}")
        row = tuple(s[n] for n in names)
        if any(v not in ok for v, ok in zip(row, sizes)) or (listed is not None and row not in listed) or row in seen:
            raise _err(where, f"profile sub-model {s} is not a sub-model of this nest (or is listed twice)")
        seen.add(row)
    costs = d["costs"]
    if not isinstance(costs, dict) or set(costs) - set(METRICS):
        raise _err(where, f"profile costs must map metrics {list(METRICS)} to lists, got {str(costs)[:80]}")
    for metric, v in costs.items():
        _numbers(v, len(subs), f"{metric!r} costs", where)
    if d.get("scores") is not None:
        _numbers(d["scores"], len(subs), "scores", where, negative=True)
    if not isinstance(d.get("device", "cpu"), str) or not isinstance(d.get("meta") or {}, dict):
        raise _err(where, "profile device must be a string and meta an object")
    from .profile import Profile  # (what sn.load builds after copying the weights: refused here, before)

    try:
        Profile.from_dict(d)
    except SortedNetError as e:
        raise _err(where, str(e)) from None

