"""Runtime files under <store>/run (store/paths.py): private, named after their process, and
removed by the next start once that process is gone (issue 15, item 9)."""

from __future__ import annotations

import os
import subprocess
import sys

from dormant.store.paths import MAX_SOCKET_PATH, clean_stale_runtime, runtime_folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_runtime_folder_is_private_and_named_after_this_process(tmp_path):
    folder = runtime_folder("zygote", tmp_path, longest_name="zygote.sock")
    assert folder.parent == tmp_path / "run"
    assert f"-{os.getpid()}-" in folder.name
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.parent.stat().st_mode & 0o777 == 0o700
    assert runtime_folder("zygote", tmp_path) != folder  # two in one process do not collide


def test_only_the_folders_of_gone_processes_are_removed(tmp_path):
    mine = runtime_folder("zygote", tmp_path)
    (mine / "zygote.sock").write_text("")
    stale = tmp_path / "run" / f"zygote-{_dead_pid()}-abc123"
    stale.mkdir()
    (stale / "zygote.sock").write_text("")
    other = tmp_path / "run" / "notes"  # not a runtime folder: left alone
    other.mkdir()
    assert clean_stale_runtime(tmp_path) == [stale]
    assert not stale.exists() and mine.exists() and other.exists()


def test_nothing_to_clean_in_a_new_store(tmp_path):
    assert clean_stale_runtime(tmp_path / "new") == []


def test_a_path_too_long_for_a_unix_socket_falls_back_to_a_private_temp_folder(tmp_path):
    deep = tmp_path / ("x" * MAX_SOCKET_PATH)
    folder = runtime_folder("zygote", deep, longest_name="zygote.sock")
    try:
        assert len(str(folder / "zygote.sock")) <= MAX_SOCKET_PATH
        assert folder.stat().st_mode & 0o777 == 0o700
    finally:
        folder.rmdir()
