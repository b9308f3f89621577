"""The arrays of an `.npz` file, memory-mapped where they lie in it, read-only.

`np.savez` stores each array as an uncompressed `.npy` member of a zip file, so its bytes sit contiguously in
the file: an array can be a view of a read-only map of the file at that offset instead of a copy in the process's
own memory. Worker processes that load the same space then share its pages (the page cache), as they share the
item cache, and a worker's memory does not grow with the space's size. `np.load` cannot do this for an `.npz`
(it ignores `mmap_mode` there). A compressed member, or one whose bytes are not where its header says, is read
into memory as `np.load` would; a file replaced later (a new space is written beside and renamed) leaves the
mapped arrays as they were, since the map holds the old file."""

from __future__ import annotations

import mmap
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_npz_mapped", "shared_tensor"]

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"


def load_npz_mapped(path: Path) -> dict[str, np.ndarray]:
    """name -> array (the member's name without `.npy`), each stored member a read-only view of one map of the
    file; compressed members are read into memory."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        size = f.seek(0, 2)
        whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        out = {}
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            mapped = _mapped(whole, f, info) if whole is not None else None
            if mapped is None:
                with archive.open(info) as member:
                    mapped = np.lib.format.read_array(member, allow_pickle=False)
            out[name] = mapped
    return out


def _mapped(whole: mmap.mmap, f, info: zipfile.ZipInfo) -> np.ndarray | None:
    """The member as a view of `whole`, or None where it cannot be one (compressed, or an unexpected layout)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size:
        return None  # truncated: read as np.load would, which says what is wrong
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_SIGNATURE:
        return None
    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    f.seek(start)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    if dtype.hasobject:
        raise ValueError(f"{info.filename}: object arrays are not loaded (they would need pickle)")
    offset = f.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset - start + nbytes != info.file_size:
        return None  # the bytes are not where the header says
    if nbytes == 0:
        return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    return np.ndarray(shape, dtype=dtype, buffer=whole, offset=offset, order="F" if fortran else "C")


def shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over a mapped array without a copy. The array is read-only (shared with other processes) and its
    readers only read it, so torch's warning about a tensor over read-only memory is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
