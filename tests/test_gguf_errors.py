"""Bad GGUF files fail with a typed error that names the file and the cause, never a raw struct/numpy error."""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from thrifty.errors import ModelFileError, ThriftyError, UnsupportedModelError
from thrifty.models.gguf_file import GGUFFile
from damage import damaged
from tiny_gguf import TinySpec, write_tiny_gguf

SMALL = TinySpec(num_layers=1, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("small") / "small.gguf", SMALL)


def layout(path: Path) -> dict[str, int]:
    """Byte offsets of the regions of a well-formed file: metadata, a token string, tensor infos, data."""
    data = path.read_bytes()
    first = b"token_embd.weight"
    return {
        "metadata": 24,
        "token_list": data.index(b"tokenizer.ggml.tokens") + 200,
        "tensor_infos": data.index(struct.pack("<Q", len(first)) + first),
        "data": min(t.offset for t in GGUFFile(path).tensors.values()),
        "end": len(data),
    }


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_names_cause(err: ThriftyError, path: Path, *causes: str) -> None:
    assert str(path) in err.message
    assert any(c in err.message for c in causes), err.message
    assert err.fix and "\n" not in str(err)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError) as exc:
        GGUFFile(tmp_path / "nope.gguf")
    assert_names_cause(exc.value, tmp_path / "nope.gguf", "does not exist")


@pytest.mark.parametrize("where, delta", [
    ("empty", 0), ("header", 10), ("metadata", 6), ("token_list", 0), ("tensor_infos", 5), ("tensor_infos", 30),
    ("data", 0), ("data", 100), ("end", -1)])
def test_truncated(small_gguf: Path, tmp_path: Path, where: str, delta: int) -> None:
    offsets = {"empty": 0, "header": 0, **layout(small_gguf)}
    cut = offsets[where] + delta
    path = write(tmp_path / "cut.gguf", small_gguf.read_bytes()[:cut])
    with pytest.raises(ModelFileError) as exc:
        GGUFFile(path)
    assert not isinstance(exc.value, UnsupportedModelError)
    assert_names_cause(exc.value, path, "truncated", "not a valid GGUF")
    if where in ("data", "end"):
        assert "ends past the end of the file" in exc.value.message


def test_bad_magic(small_gguf: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "ggml.gguf", b"GGML" + small_gguf.read_bytes()[4:])
    with pytest.raises(ModelFileError) as exc:
        GGUFFile(path)
    assert_names_cause(exc.value, path, "bad magic")


@pytest.mark.parametrize("content", [np.random.default_rng(1).bytes(10_000),
                                     b"<html><body>404 Not Found</body></html>" * 10])
def test_garbage(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path / "garbage.gguf", content)
    with pytest.raises(ModelFileError) as exc:
        GGUFFile(path)
    assert_names_cause(exc.value, path, "not a valid GGUF")


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "mamba.gguf", TinySpec(architecture="mamba", num_layers=1, hidden_size=16,
                                                             intermediate_size=32, num_heads=2, num_kv_heads=1))
    f = GGUFFile(path)  # a well-formed file: reading it is fine, running it is not
    assert f.architecture == "mamba"
    with pytest.raises(UnsupportedModelError) as exc:
        f.model_config()
    assert "'mamba'" in exc.value.message and "qwen2" in exc.value.message


def test_unsupported_version(small_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(small_gguf.read_bytes())
    struct.pack_into("<I", data, 4, 7)
    path = write(tmp_path / "v7.gguf", bytes(data))
    with pytest.raises(UnsupportedModelError, match="version 7"):
        GGUFFile(path)


@pytest.mark.parametrize("dims", [(2**62, 1187), (2**63, 2**63), (16, 2**58)])
def test_corrupt_huge_dimensions(small_gguf: Path, tmp_path: Path, dims: tuple[int, int]) -> None:
    """Dimensions whose product overflows int64 once wrapped around to a 0-byte tensor (fixed: math.prod)."""
    data = bytearray(small_gguf.read_bytes())
    pos = layout(small_gguf)["tensor_infos"] + 8 + len("token_embd.weight")
    assert struct.unpack_from("<I", data, pos)[0] == 2
    struct.pack_into("<2Q", data, pos + 4, *dims)
    path = write(tmp_path / "dims.gguf", bytes(data))
    with pytest.raises(ModelFileError) as exc:
        GGUFFile(path)
    assert_names_cause(exc.value, path, "token_embd.weight")


@pytest.mark.parametrize("alignment", [0, 24])
def test_corrupt_alignment(tmp_path: Path, alignment: int) -> None:
    """general.alignment 0 once raised ZeroDivisionError (fixed: must be a power of two)."""
    path = tmp_path / "aligned.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_custom_alignment(64)
    w.add_tensor("x", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    key = data.index(b"general.alignment") + len("general.alignment")
    assert struct.unpack_from("<II", data, key) == (4, 64)  # type uint32, value 64
    struct.pack_into("<I", data, key + 4, alignment)
    write(path, bytes(data))
    with pytest.raises(ModelFileError) as exc:
        GGUFFile(path)
    assert_names_cause(exc.value, path, "general.alignment")


def test_fuzzed_headers_give_typed_errors_only(small_gguf: Path, tmp_path: Path) -> None:
    """Random byte changes in the header, metadata and tensor directory, and cuts anywhere: a typed error
    or a file that still reads, never a bare struct / numpy / unicode exception."""
    original = small_gguf.read_bytes()
    data_start = layout(small_gguf)["data"]
    rng = np.random.default_rng(0)
    path = tmp_path / "fuzz.gguf"
    for case in damaged(original, data_start, rng, cuts=60, flips=300):
        write(path, case)
        try:
            f = GGUFFile(path)
            f.dequantized("output_norm.weight") if "output_norm.weight" in f.tensors else None
        except ThriftyError:
            pass
