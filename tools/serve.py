"""`samba-edge serve REPO`: start a real Triton Inference Server on a model repository, on 127.0.0.1.

Where tritonserver comes from, first found wins:
  1. --server-env DIR, $SAMBA_EDGE_TRITON_ENV, or ~/.cache/samba-edge/triton-env: a Python environment
     with `pip install "samba-edge[serve]"` (`samba-edge serve --setup` makes it): nvidia-pytriton's bundled
     tritonserver, python backend only, and numpy<2, which the python backend's stub needs (with numpy 2
     tensors arrive corrupted, silently).
     Its python backend runs that environment's Python, so samba-edge and onnxruntime are importable.
  2. `tritonserver` on PATH (an NGC container or JetPack's Triton release: every backend), with
     --backend-directory defaulting to /opt/tritonserver/backends.
The server's log streams to stderr; Ctrl-C (or SIGTERM) stops it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from samba_edge.runtime.errors import SambaEdgeError

@dataclass
class ServerInstall:
    binary: Path
    backend_dir: Path
    env: dict = field(default_factory=dict)          # what the server process needs on top of os.environ
    where: str = ""


def _env_candidates(server_env: Optional[str]) -> list[Path]:
    if server_env:
        return [Path(server_env)]
    out = [Path(os.environ["SAMBA_EDGE_TRITON_ENV"])] if os.environ.get("SAMBA_EDGE_TRITON_ENV") else []
    return out + [Path.home() / ".cache" / "samba-edge" / "triton-env"]


def _from_pytriton_env(env: Path) -> Optional[ServerInstall]:
    """nvidia-pytriton's tritonserver, prepared once: its python backend needs the stub for the env's Python."""
    dists = sorted(env.glob("lib/python3.*/site-packages/pytriton/tritonserver"))
    if not dists:
        return None
    dist = dists[-1]
    py = dist.parents[2].name.removeprefix("python")                  # lib/python3.X/site-packages/...
    stub = dist / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise SambaEdgeError(f"{dist} has no python backend stub for Python {py}; use Python 3.8-3.13 for {env}")
    from samba_edge.runtime.session import cache_dir

    prepared = cache_dir() / "tritonserver" / f"{dist.stat().st_mtime_ns}-py{py}"
    if not (prepared / "bin" / "tritonserver").is_file():
        tmp = prepared.with_name(prepared.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(dist, tmp, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
        prepared.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, prepared)
        except OSError:                                   # another process prepared it first
            shutil.rmtree(tmp, ignore_errors=True)
    libs = dist.parents[1] / "nvidia_pytriton.libs"
    ld = ":".join(p for p in (str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p)
    return ServerInstall(prepared / "bin" / "tritonserver", prepared / "backends",
                         {"LD_LIBRARY_PATH": ld, "PATH": f"{env / 'bin'}:{os.environ.get('PATH', '')}",
                          "VIRTUAL_ENV": str(env)}, f"nvidia-pytriton in {env}")


def find_server(server_env: Optional[str] = None, backend_dir: Optional[str] = None) -> ServerInstall:
    for env in _env_candidates(server_env):
        if env.is_dir():
            found = _from_pytriton_env(env)
            if found is not None:
                return found
        elif server_env:
            raise SambaEdgeError(f"--server-env {env} is not a directory; create it with "
                                 f"`samba-edge serve --setup --server-env {env}`")
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerInstall(Path(on_path), Path(backend_dir or "/opt/tritonserver/backends"), {}, on_path)
    raise SambaEdgeError(f"no tritonserver found (no {' or '.join(map(str, _env_candidates(server_env)))} with "
                         f"nvidia-pytriton, none on PATH); `samba-edge serve --setup` creates one")


def default_env() -> Path:
    return _env_candidates(None)[0]


def setup_server_env(env: Optional[str] = None, quiet: bool = False) -> Path:
    """Create the server environment (a venv of this Python with samba-edge[serve]: from this checkout when
    samba-edge runs from one, else the same version from the package index). Redone if a run was cut short."""
    import importlib.metadata

    import samba_edge.runtime as rt

    env_path = Path(env) if env else default_env()
    ready = env_path / ".samba-edge-ready"
    if ready.is_file():
        return env_path
    root = Path(rt.__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and 'name = "samba-edge"' in (root / "pyproject.toml").read_text():
        spec = ["-e", f"{root}[serve]"]
    else:
        spec = [f"samba-edge[serve]=={importlib.metadata.version('samba-edge')}"]
    if not quiet:
        print(f"creating the Triton server environment {env_path} ({' '.join(spec)}) ...", file=sys.stderr, flush=True)
    shutil.rmtree(env_path, ignore_errors=True)
    steps = [[sys.executable, "-m", "venv", str(env_path)],
             [str(env_path / "bin" / "python"), "-m", "pip", "install", "--quiet", *spec]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise SambaEdgeError(f"creating {env_path} failed at `{' '.join(cmd[-3:])}`: {last}")
    ready.write_text(" ".join(spec) + "\n")
    return env_path


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """One tritonserver process on loopback ports (free ones unless given); a context manager."""

    def __init__(self, repo: str | Path, grpc_port: Optional[int] = None, http_port: Optional[int] = None,
                 metrics_port: Optional[int] = None, server_env: Optional[str] = None, log=None,
                 extra_args: tuple = ()) -> None:
        self.repo = Path(repo)
        if not self.repo.is_dir() or not any(self.repo.glob("*/config.pbtxt")):
            raise SambaEdgeError(f"{self.repo} is not a Triton model repository (no NAME/config.pbtxt); write one "
                                 "with `samba-edge triton ARTIFACT -o REPO`")
        self.install = find_server(server_env)
        self.grpc_port, self.http_port = grpc_port or free_port(), http_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.log, self.extra_args, self.proc = log, extra_args, None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        return [str(self.install.binary), f"--model-repository={self.repo.resolve()}",
                f"--backend-directory={self.install.backend_dir}", "--http-address=127.0.0.1",
                "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}", "--disable-auto-complete-config",
                "--exit-on-error=true", *self.extra_args]

    def start(self, timeout: float = 180) -> "TritonServer":
        env = {**os.environ, **self.install.env}
        self.proc = subprocess.Popen(self.command(), env=env, stdout=self.log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SambaEdgeError(f"tritonserver exited with code {self.proc.returncode} before it was ready "
                                     "(its log says why)")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise SambaEdgeError(f"tritonserver was not ready within {timeout:.0f} s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)                     # the stubs are in its process group
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(repo: str, grpc_port: int, http_port: int, metrics_port: int, server_env: Optional[str]) -> int:
    """The CLI: start, say where it listens, stream the log until Ctrl-C / SIGTERM, stop."""
    server = TritonServer(repo, grpc_port, http_port, metrics_port, server_env, log=sys.stderr)
    print(f"starting tritonserver ({server.install.where}) on {repo}", file=sys.stderr, flush=True)
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True
    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
        print(f"ready: gRPC 127.0.0.1:{server.grpc_port}, HTTP 127.0.0.1:{server.http_port}, metrics "
              f"127.0.0.1:{server.metrics_port} (Ctrl-C stops it)", file=sys.stderr, flush=True)
        while not stop["now"] and server.proc.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, old)
    return 0 if stop["now"] or server.proc.returncode in (0, -signal.SIGINT, None) else 1
