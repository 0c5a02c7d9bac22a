"""Kill tests: a write killed at any point leaves the old output intact or restorable, and the next run
leaves no trace of the dead one (runtime/atomic.py)."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from samba_edge.runtime import atomic
from samba_edge.runtime.atomic import atomic_dir, check_output, recover

CK = "builtin:samba-tiny-py"


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _write(out: Path, text: str, force: bool = True) -> None:
    with atomic_dir(out, force) as tmp:
        (tmp / "payload.txt").write_text(text)


KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from samba_edge.runtime import atomic
real, calls = os.replace, []
def dies_after_first(src, dst):
    calls.append(src)
    if len(calls) == 2:
        os._exit(9)                              # killed between the two renames: no handler runs
    return real(src, dst)
atomic.os.replace = dies_after_first
with atomic.atomic_dir(Path(sys.argv[1]), force=True) as tmp:
    (tmp / "payload.txt").write_text("new")
"""


def test_replacement_killed_between_its_renames_is_restored(tmp_path, capsys):
    out = tmp_path / "art"
    _write(out, "old", force=False)
    r = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(out)], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert not out.exists() and (tmp_path / ".art.old" / "payload.txt").read_text() == "old"
    assert len(_leftovers(out)) == 2                 # .art.old and the dead run's .art.PID.* with "new"
    recover(out)                                     # what the next write to `art` does first
    assert (out / "payload.txt").read_text() == "old" and "restored" in capsys.readouterr().err
    assert _leftovers(out) == []
    _write(out, "new")
    assert (out / "payload.txt").read_text() == "new" and _leftovers(out) == []


def test_replacement_interrupted_in_process_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "art"
    _write(out, "old", force=False)
    real, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write(out, "new")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert (out / "payload.txt").read_text() == "old" and _leftovers(out) == []


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "art"
    _write(out, "x", force=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)                           # a pid that has exited
    (tmp_path / f".art.{pid}.abc").mkdir()
    (tmp_path / f".art.{pid}.calib-x").mkdir()
    (tmp_path / f".art.{os.getpid()}.live").mkdir()  # ours: in use
    (tmp_path / ".art.old").mkdir()                  # art exists: a finished replacement's remains
    recover(out)
    assert _leftovers(out) == [f".art.{os.getpid()}.live"] and (out / "payload.txt").read_text() == "x"


def test_output_that_is_the_working_directory_is_refused(tmp_path, monkeypatch):
    from samba_edge.runtime.errors import SambaEdgeError

    monkeypatch.chdir(tmp_path)
    for bad in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(SambaEdgeError, match="current directory"):
            check_output(Path(bad), force=True)


def _kill_at_random(cmd: list[str], out: Path, seconds: float, sig=signal.SIGKILL) -> int:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=out.parent)
    time.sleep(seconds)
    p.send_signal(sig)
    p.wait(timeout=300)
    return p.returncode


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_export_killed_at_a_random_point_keeps_the_old_artifact(tmp_path, seed):
    """SIGKILL during `export --force` over an existing artifact: the old one is intact (or, killed between
    the renames, restored by the next run), and the next run cleans up after the dead one."""
    pytest.importorskip("torch")
    from samba_edge.runtime.manifest import Manifest

    from samba_edge.runtime.backends import OrtBackend

    out = tmp_path / "art"
    exe = [sys.executable, "-m", "samba_edge.tools.cli", "export", CK, "-o", str(out), "--flavor", "portable"]
    assert subprocess.run(exe + ["--max-chunk", "16"], capture_output=True).returncode == 0
    _kill_at_random(exe + ["--max-chunk", "32", "--force"], out, random.Random(seed).uniform(2.0, 14.0))
    recover(out)
    assert Manifest.load(out).max_chunk in (16, 32)              # the old artifact, or the new one complete
    OrtBackend(out)                                              # ... and it opens (its files are the ones written)
    assert _leftovers(out) == []


@pytest.mark.slow
def test_sigterm_cleans_up_at_once(tmp_path):
    """SIGTERM (a service manager stopping us) runs the same cleanup as Ctrl-C: nothing is left behind."""
    pytest.importorskip("torch")
    import shutil

    exe = shutil.which("samba-edge")
    if exe is None:
        pytest.skip("the samba-edge console script is not on PATH")
    out = tmp_path / "art"
    code = _kill_at_random([exe, "export", CK, "-o", str(out), "--flavor", "portable"], out, 6.0, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and not out.exists() and _leftovers(out) == []


@pytest.mark.slow
def test_calibrate_killed_leaves_nothing_after_the_next_run(tmp_path, tiny_export):
    pytest.importorskip("onnxruntime")
    root = Path(__file__).resolve().parents[1]
    text = tmp_path / "corpus.py"
    text.write_text("\n".join(p.read_text() for p in sorted((root / "runtime").glob("*.py"))))
    out = tmp_path / "int8"
    exe = [sys.executable, "-m", "samba_edge.tools.cli", "calibrate", str(tiny_export("portable")), "-o", str(out),
           "--text", str(text), "--samples", "32", "--chunk", "64"]
    t = time.perf_counter()                          # how long a whole run takes here, so the kill lands late
    assert subprocess.run(exe, capture_output=True).returncode == 0   # in one (calibrating or writing)
    whole = time.perf_counter() - t
    shutil.rmtree(out)
    _kill_at_random(exe, out, 0.7 * whole)
    assert not out.exists()                          # never a half-written output
    recover(out)                                     # its scratch space sits beside the output, so this finds it
    assert _leftovers(out) == []


def test_snapshot_temp_files_of_dead_writers_are_removed(tmp_path, tiny_export):
    pytest.importorskip("onnxruntime")
    from samba_edge.runtime import open_model

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".s.safetensors.{int(dead.stdout)}.x1"
    stale.write_bytes(b"half a snapshot")
    s = open_model(str(tiny_export("portable"))).new_stream()
    s.feed([1, 2])
    s.snapshot(tmp_path / "s.safetensors")
    assert not stale.exists() and _leftovers(tmp_path / "s.safetensors") == []
