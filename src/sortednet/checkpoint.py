"""The safetensors container of a checkpoint, written and read with bounded work.

A safetensors file is an 8-byte little-endian header length ``n``, ``n``
bytes of JSON (``{name: {"dtype", "shape", "data_offsets"}, "__metadata__":
{str: str}}``) and the raw little-endian tensor bytes. :func:`write` streams
tensors one at a time into a temporary file beside the target (no second copy
of the weights in memory), computes a CRC-32 of every tensor's bytes on the
way and records it in the metadata, then renames the file into place.
:func:`read` parses and checks the whole table (header size, JSON shape,
dtypes, shapes, offsets that tile the data exactly) before anything else
looks at the file, and :meth:`Container.tensor` reads one tensor's bytes.
Nothing in a file is ever executed: no pickle, no regex, no import.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import stat
import sys
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import SortedNetError

__all__ = ["write", "read", "Container", "Entry", "MAX_HEADER", "DTYPES", "parse_json"]

#: the largest JSON header read (bytes); safetensors itself stops at 100 MB
MAX_HEADER = 100_000_000
MAX_NDIM = 16
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its dtype, shape and byte range (relative to the data section)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise SortedNetError(f"JSON object has the key {k!r} twice")
        out[k] = v
    return out


def _no_constant(name: str) -> None:
    raise SortedNetError(f"JSON holds {name}, which is not a number JSON allows")


def parse_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` that refuses duplicate keys, NaN / Infinity and pathological nesting,
    raising :class:`SortedNetError` naming ``what``."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except SortedNetError as e:
        raise SortedNetError(f"{what}: {e}") from None
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise SortedNetError(f"{what} is not valid JSON: {str(e)[:200]}") from None


def _crc(data: Any) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


#: ``__metadata__`` key of the CRC-32 of the rest of the header (every other metadata string and the tensor
#: table), written by :func:`write` and checked by :meth:`Container.header_ok`
HEADER_CRC = "header_crc32"


def header_crc(metadata: Mapping[str, str], table: Mapping[str, tuple[str, list[int]]]) -> str:
    """CRC-32 of a canonical text of ``metadata`` (without :data:`HEADER_CRC`) and the tensor ``table``
    (``name -> (dtype code, shape)``): independent of key order and whitespace, and of where each tensor's
    bytes lie (another writer, safetensors' ``save_file``, orders them its own way; the structure check and
    each tensor's own CRC-32 cover the bytes)."""
    doc = {"metadata": {k: v for k, v in metadata.items() if k != HEADER_CRC},
           "tensors": {k: [d, list(s)] for k, (d, s) in table.items()}}
    return _crc(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as stored in a safetensors file (little-endian, C order), on the CPU."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write(path: str, tensors: Mapping[str, torch.Tensor], metadata: Callable[[dict[str, str]], dict[str, str]]) -> None:
    """Write ``tensors`` to ``path`` atomically; ``metadata(crcs)`` gives the ``__metadata__``
    strings once the CRC-32 of every tensor (hex, by name) is known.

    The file is written under a hidden temporary name in the same folder, created with
    mode ``0o666`` so the user's umask applies (an existing file's permission bits are kept, as
    ``torch.save`` keeps them), and renamed over ``path`` at the end (a symbolic link is written
    through: the file it points to is replaced, the link stays); on any error (also
    ``KeyboardInterrupt``) the temporary file is removed and the file there is unchanged.
    """
    if sys.byteorder != "little":
        raise SortedNetError("sortednet checkpoints are written on little-endian machines only")
    names = list(tensors)
    for n in names:
        if tensors[n].dtype not in _CODES:
            raise SortedNetError(f"cannot save tensor {n!r}: dtype {tensors[n].dtype} has no safetensors code")
    table: dict[str, Any] = {}
    offset = 0
    for n in names:
        t = tensors[n]
        size = t.numel() * t.element_size()
        table[n] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size

    rows = {n: (v["dtype"], v["shape"]) for n, v in table.items()}

    def header(crcs: dict[str, str]) -> bytes:
        meta = dict(metadata(crcs))
        meta[HEADER_CRC] = header_crc(meta, rows)
        raw = json.dumps({"__metadata__": meta, **table}, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    placeholder = header({n: "0" * 8 for n in names})
    if len(placeholder) > MAX_HEADER:
        raise SortedNetError(f"checkpoint header would be {len(placeholder):,} bytes, above the "
                             f"{MAX_HEADER:,}-byte limit of safetensors (too many sub-models listed?)")
    if os.path.islink(path):  # (a "latest -> ckpt-7" link: torch.save writes through it too)
        path = os.path.realpath(path)
    if os.path.exists(path) and not os.path.isfile(path):  # (renamed into place, the file would replace it)
        raise SortedNetError(f"cannot write checkpoint {path!r}: it is not a regular file (a folder, a device, a "
                             "FIFO or a socket)")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None  # (a new file: the umask decides)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    ours = True  # (before the file exists: a Ctrl-C as os.open returns must not leave it behind)
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        except OSError as e:  # (nothing made: a file of that name, if any, is someone else's)
            ours = False
            raise SortedNetError(f"cannot write a checkpoint in {folder!r} (for {path!r}): {e.strerror or e}") \
                from e
        with os.fdopen(fd, "wb") as f:
            f.write(len(placeholder).to_bytes(8, "little"))
            f.write(placeholder)
            crcs = {}
            for n in names:
                data = _raw(tensors[n])
                f.write(data)
                crcs[n] = _crc(data)
            final = header(crcs)
            if len(final) != len(placeholder):  # CRCs are fixed-width: cannot happen
                raise SortedNetError("internal error: checkpoint header changed length")
            f.seek(8)
            f.write(final)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:  # (a full disk, a quota, a path turned into a folder meanwhile): the old file stays
        raise SortedNetError(f"cannot write checkpoint {path!r}: {e.strerror or e}; the file there (if any) is "
                             "unchanged") from e
    except (SortedNetError, KeyboardInterrupt):
        raise
    except Exception as e:  # (a tensor that cannot be read back to the CPU, ...): the old file stays too
        raise SortedNetError(f"cannot write checkpoint {path!r}: {type(e).__name__}: {e}; the file there (if "
                             "any) is unchanged") from e
    finally:
        if ours and os.path.exists(tmp):
            os.unlink(tmp)


class Container:
    """A checked safetensors file, open for reading (use as a context manager)."""

    def __init__(self, path: str, entries: dict[str, Entry], metadata: dict[str, str], start: int,
                 mm: mmap.mmap | None) -> None:
        self.path, self.entries, self.metadata, self._start, self._mm = path, entries, metadata, start, mm

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._mm is not None:
            mm, self._mm = self._mm, None
            try:
                mm.close()
            except BufferError:  # a view left open by an interrupt (a Ctrl-C as memoryview() returned): the
                pass             # mapping closes when that view is collected; the interrupt is what is raised

    def header_ok(self) -> bool | None:
        """Whether the header's own CRC-32 (:data:`HEADER_CRC`) matches the rest of the header; None when the
        file has none (written before it existed, or by another tool)."""
        stored = self.metadata.get(HEADER_CRC)
        if stored is None:
            return None
        rows = {n: (_CODES[e.dtype], list(e.shape)) for n, e in self.entries.items()}
        return stored == header_crc(self.metadata, rows)

    def crc(self, name: str) -> str:
        """CRC-32 (hex) of tensor ``name``'s bytes in the file."""
        e = self.entries[name]
        if e.end == e.begin:
            return _crc(b"")
        with memoryview(self._mm) as mv, mv[self._start + e.begin:self._start + e.end] as part:
            return _crc(part)

    def copy_into(self, name: str, targets: list[torch.Tensor]) -> None:
        """``name``'s data copied into each of ``targets`` straight from the mapped file: no temporary
        (loading allocates nothing per tensor, so running out of memory cannot stop it half way)."""
        e = self.entries[name]
        if e.end == e.begin:
            return
        with memoryview(self._mm) as mv, mv[self._start + e.begin:self._start + e.end] as part:
            with warnings.catch_warnings():  # (the mapping is read-only; the view is only read from)
                warnings.simplefilter("ignore", UserWarning)
                src = torch.frombuffer(part, dtype=e.dtype).reshape(e.shape)
            try:
                for t in targets:
                    t.copy_(src)
            finally:
                del src  # (the memoryview can only be released once no tensor views it)

    def tensor(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding ``name``'s data."""
        e = self.entries[name]
        if e.end == e.begin:
            return torch.empty(e.shape, dtype=e.dtype)
        with memoryview(self._mm) as mv, mv[self._start + e.begin:self._start + e.end] as part:
            buf = bytearray(part)
        return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)


def read(path: str | os.PathLike) -> Container:
    """Open ``path`` and check its safetensors structure; raises :class:`SortedNetError` on any fault."""
    p = os.fspath(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise SortedNetError(f"cannot read sortednet checkpoint {p!r}: {e.strerror or e}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise SortedNetError(f"cannot read sortednet checkpoint {p!r}: {size} bytes is too short for a "
                                 "safetensors file")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or n > size - 8:
            if head[:4] == b"PK\x03\x04" or head[:2] == b"\x80\x02":  # a zip archive / a pickle: torch.save
                raise SortedNetError(f"cannot read sortednet checkpoint {p!r}: it looks like a torch.save file (a zip "
                                     "archive or a pickle), not the safetensors file sn.save writes; load it with "
                                     "model.load_state_dict(torch.load(path)) (its state dict has the full model's "
                                     "keys and shapes)")
            why = f"above the limit of {MAX_HEADER:,}" if n > MAX_HEADER else "past the end of the file"
            raise SortedNetError(f"cannot read sortednet checkpoint {p!r}: header length {n:,} is {why} "
                                 "(not a safetensors file, or a damaged one)")
        raw = f.read(n)
        header = parse_json(raw, f"header of {p!r}")
        if not isinstance(header, dict):
            raise SortedNetError(f"header of {p!r} is a JSON {type(header).__name__}, not an object")
        has_meta = "__metadata__" in header
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise SortedNetError(f"header of {p!r}: __metadata__ must map strings to strings")
        entries = _entries(header, p, has_meta)
        data = size - 8 - n
        end = max((e.end for e in entries.values()), default=0)
        if end != data:
            raise SortedNetError(f"{p!r}: tensors cover {end:,} bytes but the file holds {data:,} bytes of data "
                                 "(truncated or padded)")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    return Container(p, entries, meta, 8 + n, mm)


def _entries(header: dict[str, Any], p: str, has_meta: bool = True) -> dict[str, Entry]:
    out = {}
    for name, v in header.items():
        where = f"{p!r}: tensor {name[:200]!r}"
        if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
            damaged = (" (the header looks damaged: the entry is neither a tensor nor __metadata__, and the file "
                       "has no __metadata__)" if name.startswith("__") and not has_meta else "")
            raise SortedNetError(f"{where} must have exactly dtype, shape and data_offsets{damaged}")
        dtype = DTYPES.get(v["dtype"]) if isinstance(v["dtype"], str) else None
        if dtype is None:
            raise SortedNetError(f"{where} has unknown dtype {str(v['dtype'])[:40]!r}; known: {sorted(DTYPES)}")
        shape, offs = v["shape"], v["data_offsets"]
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or \
                not all(type(s) is int and 0 <= s < 2 ** 53 for s in shape):
            raise SortedNetError(f"{where} has shape {str(shape)[:80]}; expected a list of <= {MAX_NDIM} "
                                 "non-negative ints")
        if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int and o >= 0 for o in offs):
            raise SortedNetError(f"{where} has data_offsets {str(offs)[:80]}; expected [begin, end]")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offs[1] - offs[0] != nbytes:
            raise SortedNetError(f"{where}: {v['dtype']}{shape} needs {nbytes:,} bytes but data_offsets "
                                 f"{offs} span {offs[1] - offs[0]:,}")
        out[name] = Entry(dtype, tuple(shape), offs[0], offs[1])
    pos = 0
    for name, e in sorted(out.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != pos:
            raise SortedNetError(f"{p!r}: tensor {name[:200]!r} starts at byte {e.begin:,}, expected {pos:,} "
                                 "(tensors must tile the data without gaps or overlaps)")
        pos = e.end
    return out
