"""cuda/host_region.py: the host memory the arena's backup and the restore's staging are pinned
in (the pinning itself is CUDA's: tests/gpu/test_cuda_arena.py)."""

import ctypes

import pytest

from dormant.engines.native.cuda.host_region import HUGE_PAGE, PAGE, HostRegion

pytestmark = pytest.mark.timeout(60)


def test_a_region_is_whole_huge_pages_of_writable_memory():
    region = HostRegion(5 * HUGE_PAGE + 1)
    try:
        assert region.nbytes == 6 * HUGE_PAGE
        region.touch(0, region.nbytes)
        block = (ctypes.c_char * region.nbytes).from_address(region.address)
        assert block[0] == b"\0" and block[region.nbytes - 1] == b"\0"
        block[12345] = b"x"
        region.touch(12000, 1000)  # touching writes one byte per page: the page's start
        assert block[12345] == b"x" and block[12000 // PAGE * PAGE] == b"\0"
    finally:
        region.close()
    region.close()  # idempotent


def test_a_span_covers_whole_pages_inside_the_region():
    region = HostRegion(HUGE_PAGE)
    try:
        assert region.span(0, HUGE_PAGE) == (region.address, HUGE_PAGE)
        assert region.span(PAGE + 5, 10) == (region.address + PAGE, PAGE)
        assert region.span(PAGE - 1, 2) == (region.address, 2 * PAGE)
        for offset, size in ((-1, 10), (0, 0), (HUGE_PAGE - 4, 8)):
            with pytest.raises(ValueError, match="outside the region"):
                region.span(offset, size)
    finally:
        region.close()


def test_a_region_needs_a_size():
    with pytest.raises(ValueError, match="positive"):
        HostRegion(0)
