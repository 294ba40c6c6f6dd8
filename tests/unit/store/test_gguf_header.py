"""store/gguf_header.py reads what the `gguf` package's reader reads, from the embedded
SmolLM2 GGUF and from files written by the `gguf` package's writer."""

from __future__ import annotations

import pytest

from dormant.store.gguf_header import GGUFHeaderError, KVShape, read_metadata


@pytest.mark.timeout(120)
def test_the_builtin_gguf_header_matches_the_gguf_package():
    from gguf import GGUFReader, GGUFValueType

    from dormant.store.gguf_import import builtin_gguf_path

    path = builtin_gguf_path()
    ours = read_metadata(path)
    theirs = {k: f.contents() for k, f in GGUFReader(path).fields.items()
              if f.types and f.types[0] != GGUFValueType.ARRAY and not k.startswith("GGUF.")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value) if isinstance(value, float) else ours[key] == value, key
    assert KVShape.of(ours) == KVShape(num_layers=30, num_kv_heads=3, key_size=64, value_size=64, context_length=8192)


@pytest.mark.timeout(60)
def test_explicit_key_and_value_sizes_and_nested_arrays(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "qwen3")
    writer.add_block_count(4)
    writer.add_head_count(16)
    writer.add_head_count_kv(2)
    writer.add_embedding_length(1024)
    writer.add_key_length(128)
    writer.add_value_length(96)
    writer.add_array("test.words", ["a", "bb", "ccc"])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_string("test.after", "still read")
    writer.add_tensor("w", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = read_metadata(path)
    assert meta["test.after"] == "still read" and "test.words" not in meta
    shape = KVShape.of(meta)
    assert (shape.num_layers, shape.num_kv_heads, shape.key_size, shape.value_size) == (4, 2, 128, 96)
    assert shape.bytes_per_token(2) == 4 * 2 * (128 + 96) * 2


def test_a_file_that_is_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(GGUFHeaderError):
        read_metadata(tmp_path / "x.gguf")
