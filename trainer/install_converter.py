"""Install llama.cpp's HF->GGUF converter that matches the installed llama-cpp-python:
`python -m trainer.install_converter [--sdist FILE] [--force]`.

A GGUF must be written by the converter of the llama.cpp that will load it: a newer converter can emit tensor
layouts or metadata an older llama.cpp rejects, an older one can miss fixes the runtime expects. llama-cpp-python's
source distribution vendors exactly its llama.cpp, so setup takes `vendor/llama.cpp/convert_hf_to_gguf.py`, its
`conversion/` package and its `gguf-py/` from the sdist of the *installed* version and puts them under
$LOOP_TOOLS/llama.cpp-convert/. Export then runs that script in a subprocess; nothing is cloned or built at run time
(that is why Unsloth's export fails offline). A marker records the version, so a second run is a no-op.

An sdist is untrusted input (a local file, a mirror): a member of the wanted part with an absolute path or a `..`
component is refused, and extraction uses tarfile's "data" filter, which also refuses links that point outside the
install directory, device files and unsafe modes. A refused archive installs nothing and leaves any previous install
as it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path, PurePosixPath

from loop.core.errors import LoopError, error_exit
from loop.core.paths import tools_dir

PACKAGE = "llama-cpp-python"
CONVERTER_DIR_NAME = "llama.cpp-convert"
MARKER_NAME = ".loop-converter-installed.json"
SCRIPT_NAME = "convert_hf_to_gguf.py"
# What is taken from <sdist>/vendor/llama.cpp/: the script, the package it imports its model classes from (newer
# llama.cpp split them out of the script; older ones have none) and the matching `gguf` Python package.
WANTED = (SCRIPT_NAME, "conversion/", "gguf-py/", "LICENSE")


class ConverterInstallError(LoopError, RuntimeError):
    """The converter could not be installed; the message says why and what to do."""


def default_converter_dir() -> Path:
    return tools_dir() / CONVERTER_DIR_NAME


def installed_llama_cpp_version() -> str:
    """Version of the llama-cpp-python that serves GGUFs in this environment."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ConverterInstallError(
            f"{PACKAGE} is not installed in this environment ({sys.executable}); install it first, "
            "then run `python -m trainer.install_converter`"
        ) from None


def read_marker(converter_dir: Path) -> dict | None:
    """The install marker (version, sdist hash, files), or None when the converter is not installed."""
    marker = Path(converter_dir) / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def is_installed(converter_dir: Path | None = None, version: str | None = None) -> bool:
    """True when the converter for `version` (default: the installed llama-cpp-python) is in place."""
    converter_dir = Path(converter_dir) if converter_dir else default_converter_dir()
    marker = read_marker(converter_dir)
    if not marker or not (converter_dir / SCRIPT_NAME).is_file():
        return False
    return marker.get("llama_cpp_python_version") == (version or installed_llama_cpp_version())


def download_sdist(version: str, dest: Path) -> Path:
    """`pip download` the sdist of llama-cpp-python==version into dest (setup time only; needs the package index)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"{PACKAGE}=={version}", "-d", str(dest),
    ]
    print(f"downloading the {PACKAGE} {version} source distribution (it vendors llama.cpp's converter) ...")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise ConverterInstallError(
            f"could not download the {PACKAGE}=={version} sdist (pip exit {proc.returncode}); pass a local copy with "
            f"--sdist FILE. pip said:\n{tail}"
        )
    return found[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sdist_version(tar: tarfile.TarFile, top: str) -> str | None:
    """Version from the sdist's PKG-INFO, None when it has none."""
    try:
        member = tar.getmember(f"{top}/PKG-INFO")
    except KeyError:
        return None
    fh = tar.extractfile(member)
    if fh is None:
        return None
    for line in fh.read().decode("utf-8", "replace").splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def _check_member_path(sdist: Path, name: str, rel: str) -> None:
    """Refuse an absolute member path or one with a `..` component, before anything is written."""
    if name.startswith("/") or rel.startswith("/") or ".." in PurePosixPath(rel).parts:
        raise ConverterInstallError(f"{sdist}: member {name!r} has an absolute path or '..'; refusing the archive")


def extract_converter(sdist: Path, converter_dir: Path, expected_version: str) -> list[str]:
    """Extract WANTED from the sdist into converter_dir (replacing it atomically); returns the files written."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise ConverterInstallError(f"sdist {sdist} does not exist")
    try:
        tar = tarfile.open(sdist, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ConverterInstallError(f"{sdist} is not a readable source archive: {exc}") from exc
    with tar:
        names = tar.getnames()
        scripts = [n for n in names if n.endswith(f"vendor/llama.cpp/{SCRIPT_NAME}")]
        if not scripts:
            raise ConverterInstallError(f"{sdist} has no vendor/llama.cpp/{SCRIPT_NAME}; is it a {PACKAGE} sdist?")
        base = scripts[0][: -len(SCRIPT_NAME)]  # ".../vendor/llama.cpp/"
        top = scripts[0].split("/", 1)[0]
        version = _sdist_version(tar, top)
        if version is not None and version != expected_version:
            raise ConverterInstallError(
                f"{sdist} is {PACKAGE} {version} but {expected_version} is installed; the converter must match the "
                f"llama.cpp that serves the model. Use the sdist of {expected_version}."
            )
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(base):
                continue
            rel = member.name[len(base):]
            if not any(rel == w or (w.endswith("/") and rel.startswith(w)) for w in WANTED):
                continue
            _check_member_path(sdist, member.name, rel)
            if member.islnk():
                # A hard link names its target by archive path: re-root it like the member itself.
                if not member.linkname.startswith(base):
                    raise ConverterInstallError(
                        f"{sdist}: {member.name!r} links outside {base!r}; refusing the archive")
                member = member.replace(name=rel, linkname=member.linkname[len(base):], deep=False)
            else:
                member = member.replace(name=rel, deep=False)
            members.append(member)
        converter_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".convert-staging-", dir=converter_dir.parent))
        try:
            try:
                tar.extractall(staging, members=members, filter="data")
            except (tarfile.TarError, OSError, KeyError) as exc:  # FilterError is a TarError
                raise ConverterInstallError(f"{sdist}: refusing the archive: {exc}") from exc
            written = [m.name for m in members if m.isfile() or m.islnk() or m.issym()]
            if SCRIPT_NAME not in written or not any(w.startswith("gguf-py/gguf/") for w in written):
                raise ConverterInstallError(f"{sdist} lacks {SCRIPT_NAME} or gguf-py/gguf; cannot install converter")
            # Swap in the new tree: a failure before this line leaves any previous install untouched.
            if converter_dir.exists():
                old = converter_dir.with_name(converter_dir.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                converter_dir.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            staging.rename(converter_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return sorted(written)


def install_converter(
    sdist: Path | None = None, converter_dir: Path | None = None, force: bool = False
) -> Path:
    """Install (idempotently) the converter matching the installed llama-cpp-python; returns its directory."""
    converter_dir = Path(converter_dir) if converter_dir else default_converter_dir()
    version = installed_llama_cpp_version()
    if not force and is_installed(converter_dir, version):
        print(f"converter for {PACKAGE} {version} already installed in {converter_dir}")
        return converter_dir
    with tempfile.TemporaryDirectory(prefix="llama-sdist-") as tmp:
        sdist_path = Path(sdist) if sdist else download_sdist(version, Path(tmp))
        files = extract_converter(sdist_path, converter_dir, version)
        marker = {
            "llama_cpp_python_version": version,
            "sdist": sdist_path.name,
            "sdist_sha256": _sha256(sdist_path),
            "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": len(files),
        }
    # The marker goes last: its presence means the tree beside it is complete.
    (converter_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    print(f"installed llama.cpp converter of {PACKAGE} {version} ({len(files)} files) in {converter_dir}")
    return converter_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="a local llama-cpp-python sdist (.tar.gz) instead of downloading")
    parser.add_argument("--dir", type=Path, help="install here instead of $LOOP_TOOLS/llama.cpp-convert")
    parser.add_argument("--force", action="store_true", help="reinstall even when the marker says it is current")
    args = parser.parse_args(argv)
    try:
        install_converter(args.sdist, args.dir, args.force)
    except LoopError as exc:
        return error_exit(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
