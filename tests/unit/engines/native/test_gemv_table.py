"""The FP8 decode GEMV's configs per GPU model (kernels/gemv_table.py): measured entries only,
kept in a file per device name, read back as written; no entry means fused_fp8_gemm."""

from __future__ import annotations

import pytest

from dormant.engines.native.kernels import gemv_table
from dormant.engines.native.kernels.gemv_table import GEMV_MAX_M, GemvConfig, gemv_config

H200 = "NVIDIA H200"


@pytest.fixture
def configs(tmp_path, monkeypatch):
    monkeypatch.setattr(gemv_table, "CONFIG_DIR", tmp_path)
    gemv_table.device_table.cache_clear()
    yield tmp_path
    gemv_table.device_table.cache_clear()


@pytest.mark.timeout(10)
def test_a_written_table_serves_its_device_only(configs):
    fast = GemvConfig(False, 16, 512, 8, 4, 3)
    path = gemv_table.write_table(H200, {("block", 6144, 4096, 1): fast, ("block", 6144, 4096, 2): None},
                                  "2026-12-03 bench_fp8_gemv.py --write-table", folder=configs)
    assert path == configs / "NVIDIA_H200.json"
    assert gemv_config(1, 6144, 4096, False, H200) == fast
    assert gemv_config(2, 6144, 4096, False, H200) is None  # measured: fused_fp8_gemm was faster
    assert gemv_config(1, 6144, 4096, True, H200) is None  # the channel format: not measured
    assert gemv_config(1, 6144, 4096, False, "NVIDIA H100 80GB HBM3") is None  # another GPU: no file
    assert gemv_config(1, 6144, 4096, False, None) is None


@pytest.mark.timeout(10)
def test_rows_round_up_to_the_measured_power_of_two_and_limits_hold(configs):
    wide = GemvConfig(True, 32, 256, 4)
    gemv_table.write_table(H200, {("channel", 4096, 12288, 4): wide, ("channel", 4096, 12288, 16): wide},
                           "test", folder=configs)
    assert gemv_config(3, 4096, 12288, True, H200) == wide  # 3 rows: the entry of 4
    assert gemv_config(4, 4096, 12288, True, H200) == wide
    assert gemv_config(5, 4096, 12288, True, H200) is None  # 8: none
    assert gemv_config(GEMV_MAX_M, 4096, 12288, True, H200) == wide
    assert gemv_config(GEMV_MAX_M + 1, 4096, 12288, True, H200) is None
    assert gemv_config(4, 4096, 12288 + 64, True, H200) is None  # K not a multiple of 128


@pytest.mark.timeout(10)
def test_overrides_win_over_the_device_file(configs, monkeypatch):
    gemv_table.write_table(H200, {("block", 4096, 4096, 1): GemvConfig(False, 8, 512, 16)}, "test", folder=configs)
    tried = GemvConfig(False, 32, 256, 2)
    monkeypatch.setitem(gemv_table.GEMV_TABLE, ("block", 4096, 4096, 1), tried)
    assert gemv_config(1, 4096, 4096, False, H200) == tried
    monkeypatch.setitem(gemv_table.GEMV_TABLE, ("block", 4096, 4096, 1), None)
    assert gemv_config(1, 4096, 4096, False, H200) is None


@pytest.mark.timeout(10)
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288)])
def test_the_guess_fits_the_qwen3_8b_decode_shapes(n, k):
    for m in range(1, GEMV_MAX_M + 1):
        config = gemv_table.guess_gemv_config(m, n, k)
        assert config.fits(k) and config.block_k % 128 == 0
        assert config.use_dot == (m > 4)
        assert -(-n // config.block_n) * config.split_k >= min(gemv_table.TARGET_PROGRAMS, -(-n // config.block_n))
