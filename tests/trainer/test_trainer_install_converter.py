"""The converter installer treats an sdist as untrusted: no member may land outside the install.

Each crafted archive has the real llama-cpp-python layout plus one hostile member in the part that
is extracted. The installer must refuse the whole archive with a clear error, write nothing outside
its directory, and leave a previous install exactly as it was.
"""

from __future__ import annotations

import io
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

from trainer import install_converter
from trainer.install_converter import ConverterInstallError

VERSION = metadata.version("llama-cpp-python")
TOP = f"llama_cpp_python-{VERSION}"
BASE = f"{TOP}/vendor/llama.cpp/"


def sdist(path: Path, extra: list[tarfile.TarInfo] = (), top: str = TOP) -> Path:
    base = f"{top}/vendor/llama.cpp/"
    files = {
        f"{top}/PKG-INFO": f"Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: {VERSION}\n",
        f"{base}convert_hf_to_gguf.py": "print('converter')\n",
        f"{base}gguf-py/gguf/__init__.py": "",
        f"{base}LICENSE": "MIT\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(text.encode())
            tar.addfile(member, io.BytesIO(text.encode()))
        for member in extra:
            data = b"pwned\n" if member.isfile() else None
            if data is not None:
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    return path


def regular(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, target
    return member


HOSTILE = {
    "dot-dot escape": lambda: [regular(f"{BASE}gguf-py/../../../../../escaped.py")],
    "dot-dot inside the wanted part": lambda: [regular(f"{BASE}gguf-py/gguf/../../LICENSE")],
    "symlink out by dot-dot": lambda: [link(f"{BASE}gguf-py/gguf/evil.py", "../../../../../escaped.py")],
    "symlink to an absolute path": lambda: [link(f"{BASE}conversion/evil.py", "/etc/passwd")],
    "hard link outside the converter": lambda: [link(f"{BASE}gguf-py/gguf/evil.py", f"{TOP}/PKG-INFO",
                                                     tarfile.LNKTYPE)],
    "device file": lambda: [link(f"{BASE}gguf-py/gguf/dev", "", tarfile.CHRTYPE)],
}


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_member_refuses_the_archive_and_writes_nothing(tmp_path, hostile):
    tools = tmp_path / "a" / "b" / "c" / "tools"
    target = tools / "llama.cpp-convert"
    install_converter.install_converter(sdist(tmp_path / "good.tar.gz"), target)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    with pytest.raises(ConverterInstallError, match="refusing the archive"):
        install_converter.install_converter(sdist(tmp_path / "bad.tar.gz", hostile()), target, force=True)

    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    after.pop(Path("bad.tar.gz"))
    assert after == before  # nothing escaped, the previous install is untouched
    assert not any(tools.glob(".convert-staging-*"))
    assert not (tmp_path / "a" / "escaped.py").exists() and not any(tmp_path.rglob("escaped.py"))


def test_an_archive_whose_paths_are_absolute_is_refused(tmp_path):
    with pytest.raises(ConverterInstallError, match="absolute path"):
        install_converter.install_converter(sdist(tmp_path / "abs.tar.gz", top=f"/{TOP}"), tmp_path / "conv")
    assert not (tmp_path / "conv").exists()


def test_a_symlink_that_stays_inside_the_converter_is_installed(tmp_path):
    target = tmp_path / "conv"
    archive = sdist(tmp_path / "ok.tar.gz", [link(f"{BASE}gguf-py/gguf/alias.py", "__init__.py")])
    install_converter.install_converter(archive, target)
    alias = target / "gguf-py" / "gguf" / "alias.py"
    assert alias.is_symlink() and alias.resolve() == (target / "gguf-py" / "gguf" / "__init__.py").resolve()
