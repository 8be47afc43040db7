"""The adversarial corpus: hostile and broken batch files, generated at test time (nothing binary is committed).

Each case of :data:`CASES` writes one file (:func:`write_case`) that ``valueloss inspect`` must refuse with
exit code 2 and a one-line message containing ``message``, within bounded memory and time. The
decompression bombs are built from one repeated deflate block, so a 2 GB member costs ~2 MB and milliseconds
to write. ``bytes_ok`` says whether the case is a file's content (also uploadable) or a kind of file (a FIFO,
a link to a device, a directory).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MIB = 2**20


@dataclass(frozen=True)
class Case:
    filename: str
    write: Callable[[Path], None]
    message: str
    bytes_ok: bool = True


# ---------------------------------------------------------------------------------------------- zip by hand


@dataclass(frozen=True)
class Member:
    """One zip member as stored: its name, the stored bytes, method, declared size and CRC, flag bits."""

    name: str
    data: bytes
    method: int = 0
    size: int | None = None
    crc: int | None = None
    flags: int = 0


def zip_bytes(members: list[Member], pad_names: int = 0) -> bytes:
    """A zip archive (no zip64) written field by field, so sizes, CRCs, methods and flags can lie."""
    out, central = io.BytesIO(), io.BytesIO()
    for member in members:
        name = member.name.encode()
        size = len(member.data) if member.size is None else member.size
        crc = zlib.crc32(member.data) if member.crc is None else member.crc
        offset = out.tell()
        fields = (20, member.flags, member.method, 0, 0x21, crc, len(member.data), size, len(name), 0)
        out.write(b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", *fields) + name + member.data)
        central.write(b"PK\x01\x02" + struct.pack("<HHHHHHIIIHHHHHII", 20, *fields, 0, 0, 0, 0, offset) + name)
    directory = central.getvalue()
    start = out.tell()
    out.write(directory)
    out.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(directory), start, 0))
    return out.getvalue()


def npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    """The header of a .npy file (format 1.0) declaring ``shape`` and ``dtype``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def deflated_zeros(prefix: bytes, megabytes: int) -> bytes:
    """A raw deflate stream of ``prefix`` then ``megabytes`` MiB of zeros: one flushed block, repeated."""
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)
    block_maker = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = block_maker.compress(bytes(MIB)) + block_maker.flush(zlib.Z_FULL_FLUSH)
    return start + block * megabytes + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def small_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {key: rng.normal(size=(3, 5)) for key in ("values", "old_values", "returns")}


def small_members() -> list[Member]:
    return [Member(f"{key}.npy", npy_bytes(array)) for key, array in small_batch().items()]


def zero_rows_bomb(path: Path) -> None:
    """The issue's 98 KB .npz: three (2**22, 1) float64 zero arrays, compressed (96 MiB inflated)."""
    header = npy_header((2**22, 1))
    crc = zlib.crc32(header)
    for _ in range(32):
        crc = zlib.crc32(bytes(MIB), crc)
    members = [Member(f"{key}.npy", deflated_zeros(header, 32), 8, len(header) + 32 * MIB, crc=crc)
               for key in ("values", "old_values", "returns")]
    path.write_bytes(zip_bytes(members))


def ignored_member_bomb(path: Path, megabytes: int = 2100) -> None:
    """A valid small batch plus an extra member that inflates to ~2.1 GB (CRC left 0: only its reader fails)."""
    header = npy_header((megabytes * MIB // 8,))
    bomb = Member("extra.npy", deflated_zeros(header, megabytes), 8, len(header) + megabytes * MIB, crc=0)
    path.write_bytes(zip_bytes(small_members() + [bomb]))


def _npz_with_values(member: Member) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(zip_bytes([member] + small_members()[1:]))
    return write


def _huge_shape(path: Path) -> None:
    header = npy_header((10**6, 10**6))
    path.write_bytes(zip_bytes([Member("values.npy", header + bytes(64))] + small_members()[1:]))


def _truncated(path: Path) -> None:
    header = npy_header((3, 5))
    path.write_bytes(zip_bytes([Member("values.npy", header + bytes(16))] + small_members()[1:]))


def _many_members(path: Path) -> None:
    members = small_members() + [Member(f"{i:0200d}.npy", b"") for i in range(6000)]
    path.write_bytes(zip_bytes(members))


def _object_array(path: Path) -> None:
    values = np.array([{"a": 1}, None], dtype=object)
    path.write_bytes(zip_bytes([Member("values.npy", npy_bytes(values))] + small_members()[1:]))


def _pt_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _tensors(make: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: make() for key in ("values", "old_values", "returns")}


def _pt(make: Callable[[], torch.Tensor]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nested tensors are a "prototype" (a UserWarning)
            path.write_bytes(_pt_bytes(_tensors(make)))
    return write


def _pt_compressed_record(path: Path) -> None:
    """A .pt whose data records are re-stored deflated (torch.load would inflate them)."""
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(_pt_bytes(_tensors(lambda: torch.zeros(3, 5, dtype=torch.float64)))))
    members = []
    for info in source.infolist():
        raw = source.read(info)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        members.append(Member(info.filename, compressor.compress(raw) + compressor.flush(), 8, len(raw)))
    path.write_bytes(zip_bytes(members))


def _safetensors(header: object, data: bytes = b"", length: int | None = None) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        text = header if isinstance(header, bytes) else __import__("json").dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return write


def _entry(shape: list[int], offsets: list[int], dtype: str = "F64") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _link_to_dev_zero(path: Path) -> None:
    os.symlink("/dev/zero", path)


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


LIMIT = "more than the limit of"
CASES: dict[str, Case] = {
    "npz: 3 x (2**22, 1) zeros, compressed": Case("rows.npz", zero_rows_bomb, f"4194304 sequences, {LIMIT} 65536"),
    "npz: ignored 2.1 GB member": Case("ignored.npz", ignored_member_bomb, ""),  # loads: the bomb is never read
    "npz: shape 10**12": Case("shape.npz", _huge_shape, f"1000000000000 tokens, {LIMIT}"),
    "npz: corrupt deflate stream": Case(
        "corrupt.npz", _npz_with_values(Member("values.npy", b"\xff" * 200, 8, 400)),
        "not a NumPy .npz archive (error"),
    "npz: encrypted member": Case(
        "encrypted.npz", _npz_with_values(Member("values.npy", npy_bytes(np.zeros((3, 5))), flags=1)), "is encrypted"),
    "npz: unknown compression": Case(
        "method.npz", _npz_with_values(Member("values.npy", npy_bytes(np.zeros((3, 5))), 99)), "compression method 99"),
    "npz: truncated array": Case("truncated.npz", _truncated, "values is truncated"),
    "npz: object array": Case("objects.npz", _object_array, "pickles are never loaded"),
    "npz: 6000 members": Case("members.npz", _many_members, "far more members than a batch holds"),
    "npz: not a zip": Case("text.npz", lambda p: p.write_bytes(b"hello"), "not a NumPy .npz archive (not a zip"),
    "pt: compressed records": Case("compressed.pt", _pt_compressed_record, "is compressed"),
    "pt: meta tensors": Case("meta.pt", _pt(lambda: torch.empty(3, 5, device="meta")), "on device 'meta'"),
    "pt: nested tensors": Case(
        "nested.pt", _pt(lambda: torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])), "is a nested tensor"),
    "pt: sparse tensors": Case("sparse.pt", _pt(lambda: torch.zeros(3, 5).to_sparse()), "is a sparse_coo tensor"),
    "pt: quantized tensors": Case(
        "quantized.pt", _pt(lambda: torch.quantize_per_tensor(torch.zeros(3, 5), 0.1, 0, torch.qint8)),
        "is a quantized tensor"),
    "pt: 10**12 elements of stride 0": Case(
        "strides.pt", _pt(lambda: torch.zeros(1).expand(10**6, 10**6)), f"1000000000000 tokens, {LIMIT}"),
    "pt: not a zip": Case("legacy.pt", lambda p: p.write_bytes(b"\x80\x02}q\x00."), "weights_only=True) (not a zip"),
    "safetensors: 1 TB header": Case("header.safetensors", _safetensors(b"{}", length=2**40), "declares 1099511627776"),
    "safetensors: header not JSON": Case("json.safetensors", _safetensors(b"{nope"), "its header is not JSON"),
    "safetensors: shape 10**12": Case(
        "shape.safetensors", _safetensors({"values": _entry([10**6, 10**6], [0, 8])}, bytes(8)), f"tokens, {LIMIT}"),
    "safetensors: offsets past the end": Case(
        "offsets.safetensors", _safetensors({"values": _entry([3, 5], [0, 120])}, bytes(8)), "do not fit"),
    "safetensors: unknown dtype": Case(
        "dtype.safetensors", _safetensors({"values": _entry([1], [0, 1], "F4")}, bytes(1)), "dtype 'F4'"),
    "safetensors: link to /dev/zero": Case(
        "zero.safetensors", _link_to_dev_zero, "is a character device (after following links)", bytes_ok=False),
    "npz: a FIFO": Case("fifo.npz", _fifo, "is a FIFO (named pipe)", bytes_ok=False),
    "pt: a directory": Case("folder.pt", _directory, "is a directory", bytes_ok=False),
}
"""Every case is refused (exit 2, ``message`` in the line), except the ignored bomb, which loads: its extra
member is named but never read."""


def write_case(directory: Path, name: str) -> Path:
    """Write case ``name`` into ``directory`` and return its path."""
    case = CASES[name]
    path = Path(directory) / case.filename
    case.write(path)
    return path
