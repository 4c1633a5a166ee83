"""builder.elf_strip: shared libraries lose .symtab/.strtab and still load and run.

Fixtures are real libraries: small ones that gcc builds here (64-bit, and 32-bit
with -m32), their big-endian twins (headers and symbol tables byte-swapped by
`_big_endian`), and llvmlite's 179 MB libllvmlite.so, which a child process then
JIT-compiles with. binutils (readelf, nm, strip) reads every result back. A tool
that is missing fails the test (`make setup-test` installs gcc and binutils).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path

import pytest

from llamazip.builder.elf_strip import strip_symbol_tables

SHT_SYMTAB, SHT_DYNSYM = 2, 11
SHF_ALLOC, SHF_INFO_LINK = 0x2, 0x40
PT_GNU_STACK = 0x6474E551

C_SOURCE = r"""
int llamazip_calls;                      /* .bss */
int llamazip_scale = 3;                  /* .data */
static const char greeting[] = "stripped and well";
static int times(int x) { return x * llamazip_scale; }
int llamazip_add(int a, int b) { llamazip_calls++; return times(a) + b; }
const char *llamazip_greeting(void) { return greeting; }
"""


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: this test needs gcc and binutils (apt-get install gcc binutils)")
    return path


def _run(*args: str) -> str:
    """The command's stdout; a warning on stderr (readelf's about a bad header) fails the test."""
    done = subprocess.run([_tool(args[0]), *args[1:]], capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr, f"{' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done.stdout


def _compile(tmp: Path, name: str, *flags: str) -> Path:
    source, library = tmp / f"{name}.c", tmp / f"{name}.so"
    source.write_text(C_SOURCE)
    done = subprocess.run([_tool("gcc"), "-shared", "-fPIC", "-O1", *flags, "-o", str(library), str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"gcc {' '.join(flags)} failed:\n{done.stderr}"
    return library


@pytest.fixture(scope="module")
def gcc_library(tmp_path_factory) -> Path:
    """64-bit, with debug sections (non-alloc, after the loaded part, so they move)."""
    return _compile(tmp_path_factory.mktemp("gcc64"), "sample64", "-g")


@pytest.fixture(scope="module")
def gcc_library_32(tmp_path_factory) -> Path:
    # No libc: a 32-bit libgcc/crt is seldom installed, and the library needs neither.
    return _compile(tmp_path_factory.mktemp("gcc32"), "sample32", "-m32", "-nostdlib", "-g")


def _sections(path: Path) -> list[dict]:
    """Every section as readelf -S -W reports it (not our parser)."""
    found = []
    for line in _run("readelf", "-S", "-W", str(path)).splitlines():
        if not line.lstrip().startswith("[") or "Nr]" in line:
            continue
        index, _, rest = line.partition("]")
        fields = rest.split()
        if int(index.strip(" [")) == 0:
            continue  # NULL: no name, nothing to compare
        if len(fields) == 9:  # no flags
            fields.insert(6, "")
        name, kind, address, offset, size, _, flags, link, info, align = fields
        found.append({"name": name, "type": kind, "address": int(address, 16), "offset": int(offset, 16),
                      "size": int(size, 16), "flags": flags, "link": int(link), "info": int(info),
                      "align": int(align)})
    assert found, f"readelf found no sections in {path}"
    return found


def _named(sections: list[dict], index: int) -> str:
    return "" if index == 0 else sections[index - 1]["name"]


def _program_headers(path: Path) -> str:
    """Program headers and the sections each maps, as readelf -l lists them."""
    return _run("readelf", "-l", "-W", str(path)).split("Program Headers:")[1]


def _check_stripped(original: Path, stripped: Path) -> None:
    """The stripped file holds every section but .symtab/.strtab, byte for byte,
    with the same links (by name), and its loaded part is the original's."""
    before, after = _sections(original), _sections(stripped)
    assert [s["type"] for s in after].count("SYMTAB") == 0
    assert [s["name"] for s in after] == [s["name"] for s in before if s["name"] not in (".symtab", ".strtab")]
    old_bytes, new_bytes = original.read_bytes(), stripped.read_bytes()
    for old in before:
        new = next((s for s in after if s["name"] == old["name"]), None)
        if new is None:
            continue
        for key in ("type", "address", "size", "flags", "align"):
            assert new[key] == old[key], (old["name"], key)
        assert _named(after, new["link"]) == _named(before, old["link"]), old["name"]
        if old["type"] in ("REL", "RELA") or "I" in old["flags"]:
            assert _named(after, new["info"]) == _named(before, old["info"]), old["name"]
        else:
            assert new["info"] == old["info"], old["name"]
        if old["type"] != "NOBITS":
            assert new["offset"] % max(new["align"], 1) == 0, old["name"]
            assert (new_bytes[new["offset"]:new["offset"] + new["size"]]
                    == old_bytes[old["offset"]:old["offset"] + old["size"]]), old["name"]
        if "A" in old["flags"]:
            assert new["offset"] == old["offset"], old["name"]
    # Program headers and which sections each maps: the same, so the loader sees the same file.
    assert _program_headers(stripped) == _program_headers(original)
    assert _run("readelf", "--dyn-syms", "-W", str(stripped)) == _run("readelf", "--dyn-syms", "-W", str(original))
    assert "SYMTAB" not in _run("readelf", "-S", "-W", str(stripped))
    header = _run("readelf", "-h", str(stripped))
    table = int(header.split("Start of section headers:")[1].split()[0])
    assert table % (8 if "ELF64" in header else 4) == 0


def _strip_to(source: Path, target: Path) -> bytes:
    data = source.read_bytes()
    stripped = strip_symbol_tables(data)
    assert stripped is not data and len(stripped) < len(data)
    target.write_bytes(stripped)
    return stripped


def test_a_gcc_library_loses_its_symbol_table_and_still_works(gcc_library, tmp_path):
    stripped_path = tmp_path / "stripped.so"
    stripped = _strip_to(gcc_library, stripped_path)
    _check_stripped(gcc_library, stripped_path)
    # The debug sections moved up and still read back whole.
    assert ".debug_info" in {s["name"] for s in _sections(stripped_path)}
    assert (_run("readelf", "--debug-dump=info", str(stripped_path)).split("\n", 2)[2]
            == _run("readelf", "--debug-dump=info", str(gcc_library)).split("\n", 2)[2])
    assert _run("nm", "-D", str(stripped_path)) == _run("nm", "-D", str(gcc_library))
    done = subprocess.run([_tool("nm"), str(stripped_path)], capture_output=True, text=True)
    assert "no symbols" in done.stderr and not done.stdout

    library = ctypes.CDLL(str(stripped_path))
    library.llamazip_greeting.restype = ctypes.c_char_p
    assert library.llamazip_add(5, 2) == 17 and library.llamazip_add(1, 1) == 4
    assert ctypes.c_int.in_dll(library, "llamazip_calls").value == 2
    assert library.llamazip_greeting() == b"stripped and well"

    # What binutils' strip leaves has no .symtab: nothing more to take.
    assert strip_symbol_tables(stripped) is stripped
    by_strip = tmp_path / "by_strip.so"
    _run("strip", "-o", str(by_strip), str(gcc_library))
    data = by_strip.read_bytes()
    assert strip_symbol_tables(data) is data


def test_a_32_bit_library(gcc_library_32, tmp_path):
    data = gcc_library_32.read_bytes()
    assert data[4] == 1, "gcc -m32 did not make an ELF32 file"
    _strip_to(gcc_library_32, tmp_path / "stripped.so")
    _check_stripped(gcc_library_32, tmp_path / "stripped.so")


def _big_endian(data: bytes) -> bytes:
    """The little-endian ELF with its headers and symbol tables byte-swapped, and
    its machine set to PowerPC: what binutils reads as a big-endian library (the
    code and other contents stay as they were: nobody runs it)."""
    elf64 = data[4] == 2
    header = "16sHHIQQQIHHHHHH" if elf64 else "16sHHIIIIIHHHHHH"
    program_header = "IIQQQQQQ" if elf64 else "IIIIIIII"
    section_header = "IIQQQQIIQQ" if elf64 else "IIIIIIIIII"
    symbol = "IBBHQQ" if elf64 else "IIIBBH"
    out = bytearray(data)

    def swap(fmt: str, offset: int) -> tuple:
        fields = struct.unpack_from("<" + fmt, data, offset)
        struct.pack_into(">" + fmt, out, offset, *fields)
        return fields

    fields = swap(header, 0)
    out[5] = 2  # EI_DATA: ELFDATA2MSB
    struct.pack_into(">H", out, 18, 21 if elf64 else 20)  # EM_PPC64, EM_PPC
    phoff, shoff, phentsize, phnum, shentsize, shnum = fields[5], fields[6], *fields[9:13]
    for i in range(phnum):
        swap(program_header, phoff + i * phentsize)
    for i in range(shnum):
        kind, offset, size, entsize = (lambda f: (f[1], f[4], f[5], f[9]))(swap(section_header, shoff + i * shentsize))
        if kind in (SHT_SYMTAB, SHT_DYNSYM):
            for start in range(offset, offset + size, entsize):
                swap(symbol, start)
    return bytes(out)


@pytest.mark.parametrize("bits", [64, 32])
def test_big_endian_libraries(bits, gcc_library, gcc_library_32, tmp_path):
    original = tmp_path / "big.so"
    original.write_bytes(_big_endian((gcc_library if bits == 64 else gcc_library_32).read_bytes()))
    assert "big endian" in _run("readelf", "-h", str(original))
    _strip_to(original, tmp_path / "stripped.so")
    _check_stripped(original, tmp_path / "stripped.so")


def _llvmlite_library() -> Path:
    spec = importlib.util.find_spec("llvmlite")  # without importing it, which would load the library here
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llvmlite is not installed in this interpreter (a runtime dependency, through numba)")
    path = Path(list(spec.submodule_search_locations)[0]) / "binding" / "libllvmlite.so"
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return path


JIT_CHECK = """
import ctypes, sys
import llvmlite.binding as llvm
assert llvm.ffi.lib._name.startswith(sys.argv[1]), llvm.ffi.lib._name
llvm.initialize_native_target()
llvm.initialize_native_asmprinter()
module = llvm.parse_assembly('define i32 @add(i32 %a, i32 %b) {\\n  %s = add i32 %a, %b\\n  ret i32 %s\\n}')
module.verify()
machine = llvm.Target.from_default_triple().create_target_machine()
engine = llvm.create_mcjit_compiler(module, machine)
engine.finalize_object()
add = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_int32, ctypes.c_int32)(engine.get_function_address('add'))
print(add(40, 2), llvm.get_process_triple())
"""


def test_llvmlite_library_loses_18_mb_and_still_compiles(tmp_path):
    source = _llvmlite_library()
    data = source.read_bytes()
    started = time.perf_counter()
    stripped = strip_symbol_tables(data)
    seconds = time.perf_counter() - started
    print(f"libllvmlite.so {len(data):,} -> {len(stripped):,} bytes in {seconds:.2f} s")
    assert len(data) - len(stripped) > 15_000_000  # .symtab + .strtab: 18.9 MB in llvmlite 0.50
    assert strip_symbol_tables(data) == stripped  # the same bytes every build

    # A copy of the llvmlite package around the stripped library: it JIT-compiles and runs code.
    package = tmp_path / "site" / "llvmlite"
    shutil.copytree(source.parent.parent, package, ignore=shutil.ignore_patterns("libllvmlite.so", "__pycache__"))
    stripped_path = package / "binding" / "libllvmlite.so"
    stripped_path.write_bytes(stripped)
    del data, stripped
    _check_stripped(source, stripped_path)
    assert _run("nm", "-D", str(stripped_path)) == _run("nm", "-D", str(source))

    env = {**os.environ, "PYTHONPATH": str(package.parent)}
    done = subprocess.run([sys.executable, "-c", JIT_CHECK, str(package)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result, triple = done.stdout.split()
    assert result == "42" and "linux" in triple


def _zip_bytes() -> bytes:
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", "not ELF")
    return buffer.getvalue()


@pytest.mark.parametrize("data", [
    b"", b"\x7fELF", b"\x7fELF" + bytes(60), b"#!/usr/bin/env python3\nprint('hi')\n", _zip_bytes(),
    bytes(range(256)) * 64, b"\x7fELF\x03\x01\x01" + bytes(100),  # no such ELF class
], ids=["empty", "magic-only", "zero-header", "script", "zip", "noise", "bad-class"])
def test_what_is_not_an_elf_library_comes_back_unchanged(data):
    assert strip_symbol_tables(data) is data


def test_truncated_and_relocatable_files_come_back_unchanged(gcc_library, tmp_path):
    data = gcc_library.read_bytes()
    for size in (52, 64, 4096, len(data) - 1):
        truncated = data[:size]
        assert strip_symbol_tables(truncated) is truncated, size
    (tmp_path / "object.c").write_text(C_SOURCE)
    subprocess.run([_tool("gcc"), "-c", "-fPIC", "-o", str(tmp_path / "object.o"), str(tmp_path / "object.c")],
                   check=True)
    relocatable = (tmp_path / "object.o").read_bytes()  # its relocations need the symbol table
    assert b".symtab" in relocatable and strip_symbol_tables(relocatable) is relocatable


# --- layouts it refuses (ELF64 little-endian headers, patched in place) ---------------------------

def _section_header_offsets(data: bytes | bytearray) -> list[int]:
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shnum, = struct.unpack_from("<H", data, 0x3C)
    return [shoff + 64 * i for i in range(shnum)]


def _index_of(library: Path, name: str) -> int:
    return next(i for i, s in enumerate(_sections(library), 1) if s["name"] == name)


def _patched(library: Path, edit) -> bytes:
    data = bytearray(library.read_bytes())
    edit(data, _section_header_offsets(data))
    return bytes(data)


def test_layouts_it_cannot_rewrite_safely_come_back_unchanged(gcc_library):
    symtab, comment = _index_of(gcc_library, ".symtab"), _index_of(gcc_library, ".comment")
    dynsym, shstrtab = _index_of(gcc_library, ".dynsym"), _index_of(gcc_library, ".shstrtab")

    def symtab_loaded(data, headers):  # SHF_ALLOC: the loader may read it
        struct.pack_into("<Q", data, headers[symtab] + 8, SHF_ALLOC)

    def kept_section_links_symtab(data, headers):
        struct.pack_into("<I", data, headers[comment] + 40, symtab)

    def dynamic_symbol_in_moved_section(data, headers):  # .dynsym is loaded: its indices cannot change
        offset, = struct.unpack_from("<Q", data, headers[dynsym] + 24)
        struct.pack_into("<H", data, offset + 24 + 6, shstrtab)  # symbol 1's st_shndx

    def segment_covers_symtab(data, headers):  # the PT_GNU_STACK entry made to map .symtab's bytes
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phnum, = struct.unpack_from("<H", data, 0x38)
        stack = next(phoff + 56 * i for i in range(phnum) if struct.unpack_from("<I", data, phoff + 56 * i)[0]
                     == PT_GNU_STACK)
        offset, size = struct.unpack_from("<QQ", data, headers[symtab] + 24)
        struct.pack_into("<Q", data, stack + 8, offset)
        struct.pack_into("<QQ", data, stack + 32, size, size)

    def extended_numbering(data, headers):  # e_shnum 0: the count is in section 0
        struct.pack_into("<H", data, 0x3C, 0)

    for edit in (symtab_loaded, kept_section_links_symtab, dynamic_symbol_in_moved_section, segment_covers_symtab,
                 extended_numbering):
        data = _patched(gcc_library, edit)
        assert strip_symbol_tables(data) is data, edit.__name__

    appended = gcc_library.read_bytes() + b"payload"  # data after the file that no section holds
    assert strip_symbol_tables(appended) is appended
    padded = gcc_library.read_bytes() + bytes(13)  # zero padding goes, as strip drops it
    assert strip_symbol_tables(padded) == strip_symbol_tables(gcc_library.read_bytes())


def test_indices_after_the_removed_sections_are_renumbered(gcc_library, tmp_path):
    """The section header table reordered so that .symtab/.strtab come before the other
    non-alloc sections, which then link to each other (sh_link, and sh_info under
    SHF_INFO_LINK): every such reference must follow its section to the new index."""
    sections = _sections(gcc_library)
    first_moving = min(i for i, s in enumerate(sections, 1) if "A" not in s["flags"])
    symtab, strtab = _index_of(gcc_library, ".symtab"), _index_of(gcc_library, ".strtab")
    order = list(range(first_moving)) + [symtab, strtab] + [
        i for i in range(first_moving, len(sections) + 1) if i not in (symtab, strtab)]
    new_index = {old: new for new, old in enumerate(order)}
    data = bytearray(gcc_library.read_bytes())
    headers = _section_header_offsets(data)
    table = [bytes(data[offset:offset + 64]) for offset in headers]
    for new, old in enumerate(order):
        entry = bytearray(table[old])
        link, = struct.unpack_from("<I", entry, 40)
        struct.pack_into("<I", entry, 40, new_index[link])
        data[headers[new]:headers[new] + 64] = entry
    struct.pack_into("<H", data, 0x3E, new_index[_index_of(gcc_library, ".shstrtab")])  # e_shstrndx
    comment, debug_info, debug_str, debug_abbrev = (
        new_index[_index_of(gcc_library, name)] for name in (".comment", ".debug_info", ".debug_str", ".debug_abbrev"))
    struct.pack_into("<I", data, headers[comment] + 40, debug_str)  # sh_link
    struct.pack_into("<Q", data, headers[debug_info] + 8, SHF_INFO_LINK)
    struct.pack_into("<I", data, headers[debug_info] + 44, debug_abbrev)  # sh_info
    reordered = tmp_path / "reordered.so"
    reordered.write_bytes(bytes(data))
    assert _named(_sections(reordered), new_index[symtab]) == ".symtab"

    _strip_to(reordered, tmp_path / "stripped.so")
    _check_stripped(reordered, tmp_path / "stripped.so")
    after = _sections(tmp_path / "stripped.so")
    by_name = {s["name"]: s for s in after}
    assert _named(after, by_name[".comment"]["link"]) == ".debug_str"
    assert _named(after, by_name[".debug_info"]["info"]) == ".debug_abbrev"
    assert ctypes.CDLL(str(tmp_path / "stripped.so")).llamazip_add(1, 2) == 5


def test_a_moved_section_keeps_its_alignment(gcc_library, tmp_path):
    """.shstrtab, after .strtab in the file, moves up to where the sections before
    .symtab end: given an alignment that spot does not meet, padding goes before it."""
    sections = _sections(gcc_library)
    symtab = next(s for s in sections if s["name"] == ".symtab")
    end = max(s["offset"] + s["size"] for s in sections if "A" not in s["flags"] and s["offset"] < symtab["offset"])
    align = 2
    while end % align == 0:
        align *= 2
    shstrtab = _index_of(gcc_library, ".shstrtab")
    data = _patched(gcc_library, lambda data, headers: struct.pack_into("<Q", data, headers[shstrtab] + 48, align))
    aligned = tmp_path / "aligned.so"
    aligned.write_bytes(data)
    _strip_to(aligned, tmp_path / "stripped.so")
    _check_stripped(aligned, tmp_path / "stripped.so")  # which checks offset % align == 0
    moved = next(s for s in _sections(tmp_path / "stripped.so") if s["name"] == ".shstrtab")
    assert moved["align"] == align and end < moved["offset"] < end + align


def test_the_same_input_gives_the_same_bytes(gcc_library):
    data = gcc_library.read_bytes()
    first = strip_symbol_tables(data)
    assert strip_symbol_tables(bytes(bytearray(data))) == first
    assert strip_symbol_tables(data) == first
