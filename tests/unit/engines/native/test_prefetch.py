"""The GPU start's readahead of runtime files: which files, and that asking is harmless."""

from __future__ import annotations

import pytest

from dormant.engines.native.cuda.prefetch import MAX_CACHE_FILES, prefetch, runtime_files


@pytest.mark.timeout(30)
def test_runtime_files_are_the_mapped_cublas_libraries_and_the_triton_cache(tmp_path):
    lib = tmp_path / "libcublasLt.so.13"
    lib.write_bytes(b"\0" * 4096)
    other = tmp_path / "libc.so.6"
    other.write_bytes(b"\0")
    maps = tmp_path / "maps"
    maps.write_text(
        f"7f00-7f10 r-xp 00000000 08:01 42 {lib}\n"
        f"7f10-7f20 r--p 00010000 08:01 42 {lib}\n"  # mapped twice: listed once
        f"7f20-7f30 r-xp 00000000 08:01 43 {other}\n"
        "7f30-7f40 rw-p 00000000 00:00 0 \n"
        "7ffc-7ffd rw-p 00000000 00:00 0 [stack]\n"
    )
    cache = tmp_path / "triton"
    (cache / "abc").mkdir(parents=True)
    (cache / "abc" / "kernel.cubin").write_bytes(b"x" * 100)
    (cache / "abc" / "kernel.json").write_text("{}")
    files = runtime_files(str(maps), cache)
    assert files[0] == str(lib) and files.count(str(lib)) == 1 and str(other) not in files
    assert sorted(files[1:]) == sorted([str(cache / "abc" / "kernel.cubin"), str(cache / "abc" / "kernel.json")])
    assert prefetch(files + [str(tmp_path / "gone")]) == 4096 + 100 + 2


@pytest.mark.timeout(30)
def test_a_large_triton_cache_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr("dormant.engines.native.cuda.prefetch.MAX_CACHE_FILES", 3)
    for i in range(5):
        (tmp_path / f"f{i}").write_text("x")
    assert len(runtime_files(str(tmp_path / "no-maps"), tmp_path)) == 3
    assert MAX_CACHE_FILES > 3


@pytest.mark.timeout(30)
def test_prefetch_runtime_files_logs_what_it_asked_for(tmp_path, monkeypatch, caplog):
    import logging

    from dormant.engines.native.cuda import prefetch as module

    (tmp_path / "k.cubin").write_bytes(b"x" * 10)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="dormant.engine"):
        module.prefetch_runtime_files()
    expected = len(module.runtime_files())  # the cache's file, and cuBLAS where this torch maps it
    assert str(tmp_path / "k.cubin") in module.runtime_files()
    assert any(r.getMessage().startswith(f"readahead asked for {expected} runtime files") for r in caplog.records)
