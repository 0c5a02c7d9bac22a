"""Crash-safe writes: outputs appear complete or not at all, replacements are recoverable, and what a
killed run left behind is cleaned up by the next one. Torch-free (exports, engines, calibration,
snapshots and the export cache all write through here).

Temporary names carry their owner's pid, beside the output (same filesystem, so the final step is a
rename):  .NAME.PID.RANDOM  (a directory or file being written),  .NAME.old  (the previous output while
--force swaps it). On the next write to NAME:
  * NAME missing and .NAME.old present: a replacement died between its two renames, so the old output
    is put back (and said so on stderr) before anything else;
  * .NAME.PID.* whose PID is not a live process: removed.
SIGTERM is turned into SystemExit by `exit_cleanly_on_sigterm` (the CLI installs it), so the context
managers' cleanup runs on kill as on Ctrl-C.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

from samba_edge.runtime.errors import SambaEdgeError


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                 # someone else's live process
        return True
    return True


def recover(out: Path) -> Optional[str]:
    """Finish or undo what an interrupted write to `out` left; returns what was done (also on stderr)."""
    out = Path(out)
    did = []
    old = out.with_name(f".{out.name}.old")
    if old.exists() and not out.exists():
        os.replace(old, out)
        did.append(f"restored {out} from an interrupted replacement")
    elif old.exists():
        _remove(old)
        did.append(f"removed {old.name} left by an interrupted replacement")
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(\d+)\.")
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            m = pat.match(p.name)
            if m and not _alive(int(m.group(1))):
                _remove(p)
                did.append(f"removed {p.name} left by a killed run")
    if did:
        print(f"note: {'; '.join(did)}", file=sys.stderr, flush=True)
    return "; ".join(did) or None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def check_output(out: Path, force: bool) -> None:
    """Fail before any work if OUT exists (without --force) or its parent cannot be written."""
    out = Path(out)
    if out.resolve() == Path.cwd().resolve() or out.resolve() in Path.cwd().resolve().parents:
        raise SambaEdgeError(f"-o {out} is the current directory (or holds it); give a new directory name")
    recover(out)
    if out.exists() and not force:
        raise SambaEdgeError(f"{out} already exists; pass --force to replace it or choose another path")
    if out.exists() and not out.is_dir():
        raise SambaEdgeError(f"{out} exists and is not a directory; remove it or choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise SambaEdgeError(f"cannot write to {out.parent} ({e.strerror}); choose a writable output path") from None


def temp_name(out: Path) -> str:
    return f".{Path(out).name}.{os.getpid()}."


def atomic_dir(out: Path, force: bool):
    """Context manager: yields a temp dir next to `out`, renamed onto it only if the body succeeds."""
    return _AtomicDir(Path(out), force)


class _AtomicDir:
    def __init__(self, out: Path, force: bool) -> None:
        self.out, self.force = out, force

    def __enter__(self) -> Path:
        check_output(self.out, self.force)
        self.tmp = Path(tempfile.mkdtemp(prefix=temp_name(self.out), dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        umask = os.umask(0)
        os.umask(umask)
        for p in [self.tmp, *self.tmp.rglob("*")]:                     # mkdtemp makes 0700; use the umask
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old")
            _remove(old)
            os.replace(self.out, old)        # killed here: .old is left, and recover() puts it back
            try:
                os.replace(self.tmp, self.out)
            except BaseException:            # interrupted (Ctrl-C, SIGTERM) or failed: the old output returns
                if not self.out.exists():
                    os.replace(old, self.out)
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            _remove(old)
        else:
            os.replace(self.tmp, self.out)


def link_or_copy(src, dst) -> None:
    """Hard-link `src` at `dst` where the file system allows (a 1.7 GB artifact costs nothing), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def atomic_file(path: Path):
    """A temp file path beside `path` (named for recover()); the caller writes it, then os.replace."""
    path = Path(path)
    recover(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_name(path), dir=path.parent)
    os.close(fd)
    return tmp


def temp_dir(beside: Path, what: str) -> tempfile.TemporaryDirectory:
    """Scratch space beside an output (not the system temp: calibration writes GBs there at 421M),
    removed on exit and, if the run is killed, by the next run's recover(beside)."""
    beside = Path(beside)
    recover(beside)
    return tempfile.TemporaryDirectory(prefix=temp_name(beside) + what + "-", dir=beside.parent)


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM -> SystemExit(143) in the main thread, so `with` blocks clean their temp files."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
