"""Workers start with glibc's malloc asking for transparent huge pages (_proc.worker_environ):
the environment they get, and that a process started with it really gets huge pages for a big
malloc (where the kernel and glibc offer them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dormant._proc import HUGE_PAGE_TUNABLE, worker_environ

pytestmark = pytest.mark.timeout(60)


def test_the_tunable_is_added_to_an_environment_without_one():
    env = worker_environ({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGE_TUNABLE}


def test_the_operators_other_tunables_are_kept():
    env = worker_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGE_TUNABLE}"


def test_the_operators_own_hugetlb_setting_wins():
    env = worker_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"


# a child mallocs 64 MiB, writes every page, and prints its AnonHugePages (kB)
_CHILD = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        print(line.split()[1])
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


def _glibc_at_least(major: int, minor: int) -> bool:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split() if hasattr(os, "confstr") else ("", "0.0")
    return name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (major, minor)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_worker_environment_gives_a_big_malloc_huge_pages():
    if _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {_thp_mode()!r} on this kernel")
    if not _glibc_at_least(2, 35):
        pytest.skip("glibc.malloc.hugetlb needs glibc 2.35 or newer")
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}

    def huge_kib(env: dict[str, str]) -> int:
        return int(subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                                  check=True, timeout=30).stdout)

    assert huge_kib(worker_environ(plain)) >= 32 << 10  # most of the 64 MiB
    if _thp_mode() == "madvise":
        assert huge_kib(plain) < 32 << 10  # without the tunable nobody asks
