"""Just enough ELF reading to find a cubin's kernel entry points (no GPU, no cuobjdump needed)."""
from __future__ import annotations

import struct

kElfMagic = b"\x7fELF"
kMachineCuda = 190  # EM_CUDA
kSymbolIsFunction = 2  # STT_FUNC
kStoCudaEntry = 0x10  # st_other bit nvcc/ptxas set on __global__ entry points


class CubinError(ValueError):
    """The bytes are not a readable 64-bit CUDA ELF."""


def _section_headers(image: bytes):
    if len(image) < 64 or image[:4] != kElfMagic or image[4] != 2 or image[5] != 1:
        raise CubinError("not a 64-bit little-endian ELF")
    machine, = struct.unpack_from("<H", image, 18)
    if machine != kMachineCuda:
        raise CubinError(f"ELF machine {machine} is not EM_CUDA ({kMachineCuda})")
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, _ = struct.unpack_from("<HHH", image, 0x3A)
    if shoff + shnum * shentsize > len(image) or shentsize < 64:
        raise CubinError("section header table lies past the end of the file (truncated?)")
    headers = []
    for index in range(shnum):
        (name, kind, _flags, _addr, offset, size, link, info, _align,
         entsize) = struct.unpack_from("<IIQQQQIIQQ", image, shoff + index * shentsize)
        if kind != 8 and offset + size > len(image):  # 8 = SHT_NOBITS occupies no file bytes
            raise CubinError(f"section {index} lies past the end of the file (truncated?)")
        headers.append((kind, offset, size, link, entsize))
    return headers


def _c_string(image: bytes, offset: int) -> str:
    end = image.index(b"\0", offset)
    return image[offset:end].decode("utf-8", "replace")


def kernel_symbols(image: bytes) -> list[str]:
    """Mangled names of every ``__global__`` entry point in ``image`` (a cubin)."""
    headers = _section_headers(image)
    names = []
    for kind, offset, size, link, entsize in headers:
        if kind != 2:  # SHT_SYMTAB
            continue
        strtab_offset = headers[link][1]
        for pos in range(offset, offset + size, entsize or 24):
            st_name, st_info, st_other, _shndx, _value, _size = struct.unpack_from(
                "<IBBHQQ", image, pos)
            if st_info & 0xF == kSymbolIsFunction and st_other & kStoCudaEntry:
                names.append(_c_string(image, strtab_offset + st_name))
    return names


def single_kernel_symbol(image: bytes, what: str = "the cubin") -> str:
    """The one entry point of a JIT cubin; a clear error when there are none or several."""
    names = kernel_symbols(image)
    if len(names) != 1:
        raise CubinError(
            f"{what} holds {len(names)} kernel entry points {names}; a JIT translation unit must "
            "instantiate exactly one (keep headers free of non-template __global__ functions)")
    return names[0]


kFormatSizedValue = 4  # EIFMT_SVAL: u16 size + payload; EIFMT_NVAL/BVAL/HVAL records are 4 bytes
kAttrKernelParamInfo = 0x17  # EIATTR_KPARAM_INFO: index u32, ordinal u16, offset u16, flags u32


def kernel_param_sizes(image: bytes, symbol: str) -> list[int] | None:
    """Byte size of each parameter of ``symbol`` (in order), from its ``.nv.info`` section.

    None when the section cannot be read; the launcher then skips its argument check.
    """
    try:
        headers = _section_headers(image)
        shstrndx, = struct.unpack_from("<H", image, 0x3E)
        names_offset = headers[shstrndx][1]
        shoff, = struct.unpack_from("<Q", image, 0x28)
        shentsize, = struct.unpack_from("<H", image, 0x3A)
        wanted = f".nv.info.{symbol}"
        for index, (_kind, offset, size, _link, _entsize) in enumerate(headers):
            name_index, = struct.unpack_from("<I", image, shoff + index * shentsize)
            if _c_string(image, names_offset + name_index) == wanted:
                return _param_sizes(image[offset:offset + size])
    except (CubinError, struct.error, ValueError, IndexError):
        return None
    return None


def _param_sizes(info: bytes) -> list[int] | None:
    params, pos = {}, 0
    while pos + 4 <= len(info):
        form, attribute = info[pos], info[pos + 1]
        if form != kFormatSizedValue:
            pos += 4
            continue
        length, = struct.unpack_from("<H", info, pos + 2)
        if attribute == kAttrKernelParamInfo and length >= 12:
            _, ordinal, _, flags = struct.unpack_from("<IHHI", info, pos + 4)
            params[ordinal] = (flags >> 18) & 0x3FFF
        pos += 4 + length
    if sorted(params) != list(range(len(params))):
        return None
    return [params[i] for i in range(len(params))]
