"""One bake per output: the lock beside --out, taken over from dead processes, and what killed bakes left."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_overwrite_safety import finished_output, markers, snapshot

from promptbake.errors import OutputLockedError
from promptbake.lock import OutputLock, lock_output, lock_path

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from promptbake.lock import OutputLock
    lock = OutputLock.acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
""")


def holder(out: Path) -> subprocess.Popen:
    """A real process that takes the lock on `out` and keeps it until killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_lock_file_names_the_holder_and_goes_when_released(tmp_path):
    out = tmp_path / "baked"
    with lock_output(out) as lock:
        assert lock.path == tmp_path / ".baked.lock"
        record = json.loads(lock.path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert time.strptime(record["started"], "%Y-%m-%dT%H:%M:%SZ")
    assert not lock.path.exists() and list(tmp_path.iterdir()) == []


def test_a_second_bake_on_the_same_output_stops_at_once_naming_the_other(tmp_path):
    out = tmp_path / "baked"
    proc = holder(out)
    try:
        started = json.loads(lock_path(out).read_text())["started"]
        # A lock that waited would wait for the holder's 120 s and then succeed: this raising shows it doesn't.
        with pytest.raises(OutputLockedError) as err:
            with lock_output(out):
                pass
        assert str(err.value) == (f"--out {out} is being baked by process {proc.pid}, started {started} (lock "
                                  f"{lock_path(out)}); wait for it to finish, or choose another --out.")
        assert lock_path(out).exists()  # the holder's lock is left alone
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_in_the_same_process_also_excludes(tmp_path):
    out = tmp_path / "baked"
    with lock_output(out):
        with pytest.raises(OutputLockedError, match=f"process {os.getpid()}"):
            OutputLock.acquire(out)
    with lock_output(out):  # released: free again
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_notice(tmp_path):
    out = tmp_path / "baked"
    proc = holder(out)
    left = json.loads(lock_path(out).read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock_path(out).exists()  # a kill -9 can't remove it
    notes = []
    with lock_output(out, notes.append) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert notes == [f"took over the lock {lock_path(out)} from process {proc.pid}, started {left['started']}, "
                     "which is no longer running."]


def test_an_empty_lock_file_is_taken_over_quietly_as_another_process(tmp_path):
    out = tmp_path / "baked"
    lock_path(out).write_text("")  # a holder killed before it wrote its record
    notes = []
    with lock_output(out, notes.append):
        pass
    assert notes == []


def test_stale_partial_folders_of_this_output_are_removed(tmp_path):
    out = tmp_path / "baked"
    for name in (".baked.partial-abc12_x9", ".baked.partial-00000000"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half a model")
    others = {  # folders of other outputs, and user folders that only look alike
        ".baked2.partial-abcdefgh": None, ".baked.partial-abcdefgh.partial-12345678": None,
        ".baked.partial-mine": None, "baked.partial-abcdefgh": None,
    }
    for name in others:
        others[name] = markers(tmp_path / name)
    notes = []
    with lock_output(out, notes.append):
        pass
    assert notes == [f"removed 2 unfinished output folders left beside {out} by a bake that was stopped "
                     "(.baked.partial-00000000, .baked.partial-abc12_x9)."]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
    assert {name: snapshot(tmp_path / name) for name in others} == others


def test_a_live_bakes_partial_folder_is_never_touched(tmp_path):
    out = tmp_path / "baked"
    partial = tmp_path / ".baked.partial-abcdefgh"
    kept = finished_output(partial)
    proc = holder(out)
    try:
        with pytest.raises(OutputLockedError):
            with lock_output(out):
                pass
        assert snapshot(partial) == kept
    finally:
        proc.kill()
        proc.wait()


def test_an_output_moved_aside_by_a_killed_publish_is_put_back(tmp_path):
    out = tmp_path / "baked"
    aside = tmp_path / ".baked.old-4242-0badcafe"
    kept = finished_output(aside)
    notes = []
    with lock_output(out, notes.append):
        pass
    assert snapshot(out) == kept and not aside.exists()
    assert notes == [f"put the earlier output back at {out} from {aside.name}, where a bake that was stopped while "
                     "replacing it had moved it."]


def test_an_output_replaced_before_the_kill_is_removed(tmp_path):
    out = tmp_path / "baked"
    new = finished_output(out, tag="new")
    aside = tmp_path / ".baked.old-4242-0badcafe"
    finished_output(aside)
    notes = []
    with lock_output(out, notes.append):
        pass
    assert snapshot(out) == new and not aside.exists()
    assert notes == [f"removed {aside.name}, the earlier output a finished bake had replaced with {out}."]


def test_an_output_moved_aside_is_kept_when_out_now_holds_something_else(tmp_path):
    out = tmp_path / "baked"
    mine = markers(out)
    aside = tmp_path / ".baked.old-4242-0badcafe"
    kept = finished_output(aside)
    notes = []
    with lock_output(out, notes.append):
        pass
    assert snapshot(out) == mine and snapshot(aside) == kept
    assert notes == [f"left {aside} alone: it holds an earlier output of {out}, which is not a finished bake now."]
