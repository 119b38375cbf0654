"""What the compiled extension ``lora_fused._C`` was built with, read from the binary itself.

Read from the file rather than recorded at build time, so it cannot disagree with the
library that actually loads: the compilers from the ELF ``.comment`` section, the GPU
architectures from the CUDA fat binaries in ``.nv_fatbin`` (SASS: machine code for one
``sm_XX``; PTX: code the driver compiles for ``compute_XX`` and newer GPUs). Linux (64-bit
little-endian ELF) only; elsewhere the report says it did not look.
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
from pathlib import Path

EXTENSION = "lora_fused._C"
FATBIN_MAGIC = 0xBA55ED50
# Fat binary layout: a container header (magic u32, version u16, header size u16, payload
# size u64) followed by entries, each with a header of: kind u16 (1 = PTX, 2 = ELF/SASS),
# u16, header size u32, payload size u64, u32, u32, minor u16, major u16, arch u32, ...
_CONTAINER = struct.Struct("<IHHQ")
_ENTRY = struct.Struct("<HHIQIIHHI")
_ENTRY_KINDS = {1: "ptx", 2: "sass"}


def elf_sections(data) -> dict[str, tuple[int, int]]:
    """``{section name: (offset, size)}`` of a 64-bit little-endian ELF file's bytes."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, section_offset + i * entry_size) for i in range(count)]
    names_offset = headers[names_index][4]
    sections = {}
    for name_offset, kind, _flags, _address, offset, size in headers:
        start = names_offset + name_offset
        name = bytes(data[start:data.find(b"\0", start)]).decode(errors="replace")
        sections[name] = (offset, 0 if kind == 8 else size)  # SHT_NOBITS (.bss) has no bytes in the file
    return sections


def cuda_architectures_in_fatbin(section: bytes) -> dict[str, list[str]]:
    """``{"sass": ["sm_80", ...], "ptx": ["compute_90", ...]}`` from ``.nv_fatbin`` bytes."""
    found: dict[str, set[int]] = {"sass": set(), "ptx": set()}
    position = 0
    while position + _CONTAINER.size <= len(section):
        magic, _version, header_size, payload_size = _CONTAINER.unpack_from(section, position)
        if magic != FATBIN_MAGIC:
            position += 8  # containers are 8-byte aligned; skip padding between them
            continue
        entry, end = position + header_size, position + header_size + payload_size
        while entry + _ENTRY.size <= end:
            kind, _, entry_header, entry_size, _, _, _minor, _major, arch = _ENTRY.unpack_from(section, entry)
            if kind in _ENTRY_KINDS:
                found[_ENTRY_KINDS[kind]].add(arch)
            if entry_header == 0:
                break
            entry += entry_header + entry_size
        position = end
    return {"sass": [f"sm_{a}" for a in sorted(found["sass"])],
            "ptx": [f"compute_{a}" for a in sorted(found["ptx"])]}


def inspect_binary(path: str | Path) -> dict:
    """Compilers and CUDA architectures of the shared library at ``path``."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            sections = elf_sections(data)
        except (ValueError, struct.error, IndexError) as exc:
            return {"path": str(path), "error": f"not inspected ({exc})"}
        offset, size = sections.get(".comment", (0, 0))
        compilers = list(dict.fromkeys(s.decode(errors="replace") for s in data[offset:offset + size].split(b"\0") if s))
        offset, size = sections.get(".nv_fatbin", (0, 0))
        archs = cuda_architectures_in_fatbin(bytes(data[offset:offset + size]))
    return {"path": str(path), "compilers": compilers, "cuda_sass": archs["sass"], "cuda_ptx": archs["ptx"]}


def extension_info() -> dict:
    """Where ``lora_fused._C`` is, and what it was built with (or why it is missing)."""
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return {"path": None, "error": "lora_fused._C is not built (pip install -e . --no-build-isolation)"}
    return inspect_binary(spec.origin)
