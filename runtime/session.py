"""The streaming runtime: a loaded model, many streams over it, each carrying its own state.

    model = open_model("tiny-onnx")                 # export dir (ort) | checkpoint / builtin:NAME (torch)
    s = model.new_stream()
    for piece in s.generate_text("def f(x):", SamplingParams(max_new_tokens=40)):
        print(piece, end="")
    s.snapshot("conv.safetensors")                  # later, anywhere: model.restore("conv.safetensors")

Everything is driven by the artifact's manifest; positions are exact across any number of calls;
long inputs are split into chunks of the manifest's max chunk. Torch is imported only for the
torch backend.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.sampling import SamplingParams, choose
from samba_edge.runtime.snapshot import load_snapshot, save_snapshot
from samba_edge.runtime.userio import token_ids

BACKENDS = ("auto", "ort", "torch", "trt")
BATCHES_KEPT = 4                    # batched steps whose output state Model.step can feed again without a copy


def cache_dir() -> Path:
    return Path(os.environ.get("SAMBA_EDGE_CACHE", Path.home() / ".cache" / "samba-edge"))


def cached_export(checkpoint: str, flavor: str = "portable", config: Optional[str] = None) -> Path:
    """Export a checkpoint once (keyed by its files' paths, sizes and mtimes) and reuse the artifact."""
    from importlib.metadata import version

    import samba_edge.export as exporter
    from samba_edge.export.locate import resolve      # torch-free: a cache hit imports no PyTorch

    src = resolve(checkpoint).resolve()
    files = sorted(src.rglob("*")) if src.is_dir() else [src]
    key = hashlib.sha256(f"{version('samba-edge')}|{flavor}|{src}|{config}".encode())
    for f in sorted(Path(exporter.__file__).parent.glob("*.py")):          # the exporter's own code too
        key.update(f.read_bytes())
    for f in files:
        if f.is_file():
            st = f.stat()
            key.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    out = cache_dir() / "exports" / f"{src.name}-{flavor}-{key.hexdigest()[:16]}"
    ok = (out / "manifest.json").is_file() and _cache_entry_ok(out)
    if not ok:
        import sys
        import time

        if (out / "manifest.json").is_file():
            print(f"note: the cached export {out} is damaged; exporting it again", file=sys.stderr, flush=True)
        from samba_edge.runtime.progress import enabled

        say = enabled()                  # the first run would otherwise be silent for half a minute
        t0 = time.monotonic()
        if say:
            print(f"exporting {checkpoint} to ONNX once (cached in {out}) ...", file=sys.stderr, flush=True)
        from samba_edge.export.onnx_export import export_onnx

        export_onnx(checkpoint, out, flavor=flavor, config=config, force=True)
        if say:
            print(f"exported in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def _cache_entry_ok(out: Path) -> bool:
    """A cache entry is used only if its manifest reads and its graph files are the ones written: hashed
    once, then again whenever a file's size or mtime differs from the last verified ones."""
    from samba_edge.runtime.integrity import graph_files, verify
    from samba_edge.runtime.manifest import Manifest

    try:
        m = Manifest.load(out)
        stamp = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in graph_files(out, m.onnx_file)])
        seen = out / ".verified"
        if seen.is_file() and seen.read_text() == stamp:
            return True
        if not verify(out, m, always=True):
            return False
        seen.write_text(stamp)
        return True
    except (SambaEdgeError, OSError):
        return False


_noted: set = set()


def _ort_runs(checkpoint: str) -> bool:
    """auto on a checkpoint: ONNX Runtime on its cached export (several times PyTorch eager's speed on
    CPU) where onnxruntime and the exporter are installed, said once per checkpoint (on a terminal)."""
    import importlib.util
    import sys

    if not all(importlib.util.find_spec(m) for m in ("onnxruntime", "torch", "onnx", "onnxscript")):
        return False
    from samba_edge.runtime.progress import enabled

    if checkpoint not in _noted and enabled():
        _noted.add(checkpoint)
        print(f"note: running {checkpoint} with ONNX Runtime on its ONNX export (cached); --backend torch runs "
              "PyTorch eager", file=sys.stderr, flush=True)
    return True


def open_model(path: str, backend: str = "auto", threads: Optional[int] = None,
               tokenizer: Optional[str] = None, config: Optional[str] = None) -> "Model":
    """Load an artifact or a checkpoint with a backend. ONNX Runtime on a checkpoint (`auto` where it is
    installed, or `--backend ort`) runs its export, made once and cached."""
    path = str(path)
    is_engine = not path.startswith("builtin:") and (Path(path) / "engine.json").is_file()
    is_artifact = not is_engine and not path.startswith("builtin:") and (Path(path) / "manifest.json").is_file()
    if backend not in BACKENDS:
        raise SambaEdgeError(f"unknown backend {backend!r}; use one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "trt" if is_engine else "ort" if is_artifact or _ort_runs(path) else "torch"
    if (backend == "trt") != is_engine:
        if is_engine:
            from samba_edge.runtime.engine_dir import built_from

            raise SambaEdgeError(f"{path} is a TensorRT engine directory, which only --backend trt runs (on a GPU); "
                                 f"the {backend} backend runs {built_from(path)}")
        raise SambaEdgeError(f"--backend trt runs an engine directory; build one with "
                             f"`samba-edge build {path} -o ENGINE_DIR` (on the GPU that will run it)")
    if not is_artifact and not path.startswith("builtin:"):
        if not Path(path).exists():
            raise SambaEdgeError(f"{path} not found; pass an export directory, a checkpoint or builtin:NAME")
        if (Path(path) / "model.onnx").is_file():
            raise SambaEdgeError(f"{path} has a model.onnx but no manifest.json, so it is not a samba-edge artifact; "
                                 "re-export it with `samba-edge export`")
    if backend == "trt":
        from samba_edge.runtime.trt_backend import TrtBackend

        be = TrtBackend(path)
    elif backend == "ort":
        from samba_edge.runtime.backends import OrtBackend

        be = OrtBackend(path if is_artifact else cached_export(path, config=config), threads)
    else:
        if is_artifact:
            raise SambaEdgeError(f"{path} is an exported artifact; the torch backend takes a checkpoint (use --backend ort)")
        try:
            from samba_edge.export.torch_backend import TorchBackend
        except ImportError:
            raise SambaEdgeError("the torch backend needs PyTorch: pip install 'samba-edge[export]'") from None
        be = TorchBackend.open(path, config)
    from samba_edge.runtime.tokenizer import find_tokenizer, load_tokenizer

    tok = load_tokenizer(be.directory, tokenizer) if (tokenizer or find_tokenizer(be.directory)) else None
    return Model(be, tok)


class Model:
    """One loaded model; any number of independent streams; safe to use from several threads."""

    def __init__(self, backend, tokenizer=None) -> None:
        self.backend, self.tokenizer, self.manifest = backend, tokenizer, backend.manifest
        self.vocab_size = self.manifest.vocab_size
        self.max_chunk = self.manifest.max_chunk
        # ORT sessions run concurrently; a torch module and a TensorRT execution context do not
        self._lock = threading.Lock() if backend.name in ("torch", "trt") else None
        # the last batched steps' streams -> (stacked output state, the per-stream views split from it): the
        # same streams stepped again (a decode loop; a server's alternating cohorts) feed that state as it is
        # instead of stacking N windows. The views keep the stacked arrays alive anyway: this costs no memory
        # while the streams live.
        from samba_edge.runtime.backends import HostState

        self._host_state = isinstance(backend, HostState)
        self._batches: collections.OrderedDict = collections.OrderedDict()
        self._batch_lock = threading.Lock()

    def run(self, ids: np.ndarray, start_pos: np.ndarray, state: list[np.ndarray]):
        if self._lock is None:
            return self.backend.run(ids, start_pos, state)
        with self._lock:
            return self.backend.run(ids, start_pos, state)

    def new_stream(self, seed: int = 0) -> "Stream":
        return Stream(self, seed)

    def restore(self, path: str | Path) -> "Stream":
        """A stream continued from a snapshot (from any backend of the same model)."""
        s = Stream(self, 0)
        s.load(path)
        return s

    def step(self, streams: Sequence["Stream"], tokens: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Advance several streams by the same number of tokens in ONE backend call (e.g. batched decode).
        Rows may sit at different positions. Returns each stream's last-position logits."""
        if not streams or len(streams) != len(tokens):
            raise SambaEdgeError("a batched step needs one token list per stream")
        if len({id(s) for s in streams}) != len(streams):
            raise SambaEdgeError("a batched step got the same stream twice; each row must be a different stream "
                                 "(feed one stream's tokens as one list)")
        tokens = [token_ids(t, self.vocab_size, f"tokens of stream {i}") for i, t in enumerate(tokens)]
        if len({t.size for t in tokens}) != 1 or not tokens[0].size:
            raise SambaEdgeError("a batched step needs equally long, non-empty token lists (one per stream)")
        locks = sorted({id(s): s._lock for s in streams}.items())
        for _, lk in locks:
            lk.acquire()
        try:
            ids = np.stack(tokens)
            pos = np.array([s.position for s in streams], dtype=np.int64)
            be = self.backend
            with self._lock or contextlib.nullcontext():     # a batch slot (TensorRT) is held stack..split
                logits, new = be.run(ids, pos, self._stacked(streams))
                parts = be.split_state(new, len(streams))
                if self._host_state:
                    with self._batch_lock:
                        self._batches[tuple(map(id, streams))] = (new, parts)
                        while len(self._batches) > BATCHES_KEPT:
                            self._batches.popitem(last=False)
            out = []
            for i, (s, st) in enumerate(zip(streams, parts)):
                s.state = st
                s._advance(tokens[i], logits[i, -1])
                out.append(s.last_logits)
            return out
        finally:
            for _, lk in locks:
                lk.release()

    def _stacked(self, streams: Sequence["Stream"]) -> list:
        """The streams' states stacked on the batch axis: a recent step's output itself when these streams are
        exactly that batch, in order, and each still holds the state that step gave it (no copy of N windows)."""
        key = tuple(map(id, streams))
        with self._batch_lock:
            kept = self._batches.pop(key, None)
            if kept is not None and all(len(s.state) == len(p) and all(a is b for a, b in zip(s.state, p))
                                        for s, p in zip(streams, kept[1])):
                return kept[0]
        return self.backend.stack_states([s.state for s in streams])

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise SambaEdgeError("this model has no tokenizer; pass token ids or --tokenizer")
        return self.tokenizer.encode(text)


class TextStream:
    """Text on top of a stream's token API (feed, generate_ids, position, model.tokenizer): shared by the
    local Stream and the remote one (runtime/remote.py)."""

    def feed_text(self, text: str) -> np.ndarray:
        """Text; a fresh stream starts with the tokenizer's document-start token when it has one."""
        if not text:
            raise SambaEdgeError("the prompt is empty; give some text")
        tok = self.model.tokenizer
        start = None if tok is None else (tok.bos_id if tok.bos_id is not None else tok.eos_id)
        ids = ([start] if self.position == 0 and start is not None else []) + self.model.encode(text)
        return self.feed(ids)

    def generate_text(self, prompt: Optional[str], params: SamplingParams) -> Iterator[str]:
        """Feeds `prompt` (if any), then yields text as it is produced; never a broken UTF-8 sequence;
        stops at EOS, stop ids, stop strings (excluded) or max_new_tokens."""
        if self.model.tokenizer is None:
            raise SambaEdgeError("text generation needs a tokenizer; this model has none")
        if prompt:
            self.feed_text(prompt)
        decoder = IncrementalDecoder(self.model.tokenizer)
        held, hold = "", max((len(s) for s in params.stop), default=1) - 1
        for tok in self.generate_ids(params):
            held += decoder.push(tok)
            cut = min((held.find(s) for s in params.stop if s in held), default=-1)
            if cut >= 0:
                yield held[:cut]
                return
            if len(held) > hold:
                yield held[: len(held) - hold]
                held = held[len(held) - hold:]
        yield held + decoder.flush()


class Stream(TextStream):
    """One sequence: its recurrent state, absolute position, last logits and sampler state."""

    def __init__(self, model: Model, seed: int = 0) -> None:
        self.model = model
        self.state = model.backend.new_state(1)        # numpy, or device buffers (TensorRT)
        self.position = 0
        self.last_logits: Optional[np.ndarray] = None
        self.rng = np.random.default_rng(seed)
        self.recent: collections.deque = collections.deque(maxlen=4096)
        self._lock = threading.RLock()

    # ---- feeding ------------------------------------------------------------------------------
    def _check(self, ids) -> np.ndarray:
        return token_ids(ids, self.model.vocab_size)

    def _advance(self, ids, logits: np.ndarray) -> None:
        self.position += len(ids)
        self.recent.extend(int(i) for i in ids)
        self.last_logits = logits[: self.model.vocab_size].astype(np.float32)

    def feed(self, ids) -> np.ndarray:
        """Consume token ids (any number of calls, any lengths); returns the last position's logits (V,)."""
        with self._lock:
            a = self._check(ids)
            if a.size == 0:
                raise SambaEdgeError("nothing to feed: the token list is empty")
            for p in range(0, a.size, self.model.max_chunk):
                piece = a[p:p + self.model.max_chunk]
                logits, self.state = self.model.run(piece[None], np.array([self.position]), self.state)
                self._advance(piece, logits[0, -1])
            return self.last_logits

    # ---- generation -----------------------------------------------------------------------------
    def generate_ids(self, params: SamplingParams) -> Iterator[int]:
        """Yields new token ids. Each is fed before it is yielded, so the stream's state always covers
        every token produced (a snapshot taken between tokens continues exactly)."""
        if self.last_logits is None:
            raise SambaEdgeError("feed a prompt before generating")
        if params.seed is not None:
            self.rng = np.random.default_rng(params.seed)
        stop_ids = set(params.stop_token_ids)
        eos = self.model.tokenizer.eos_id if self.model.tokenizer is not None else None
        for _ in range(params.max_new_tokens):
            with self._lock:
                recent = list(self.recent)[-params.repetition_window:]
                tok = choose(self.last_logits, params, self.rng, recent)
                if tok == eos or tok in stop_ids:
                    return
                self.feed([tok])
            yield tok

    # ---- snapshots --------------------------------------------------------------------------
    def snapshot(self, path: str | Path) -> Path:
        with self._lock:
            extra = {"rng": self.rng.bit_generator.state, "recent": list(self.recent)}
            arrays = {} if self.last_logits is None else {"last_logits": self.last_logits}
            return save_snapshot(path, self.model.manifest, self.model.backend.state_to_host(self.state, self.position),
                                 self.position, extra, arrays)

    def load(self, path: str | Path) -> None:
        with self._lock:
            state, position, extra, arrays = load_snapshot(path, self.model.manifest)
            self.state, self.position = self.model.backend.state_from_host(state, position), position
            self.rng = np.random.default_rng()
            if "rng" in extra:                          # checked by load_snapshot
                self.rng.bit_generator.state = extra["rng"]
            self.recent = collections.deque(extra.get("recent", []), maxlen=4096)
            self.last_logits = arrays.get("last_logits")


class IncrementalDecoder:
    """Token ids -> text pieces, decoding a small window with one token of left context (so
    SentencePiece's leading spaces survive) and holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer) -> None:
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        rest = self.tok.decode(self.ids[self.prefix:])[len(prefix_text):]
        self.prefix = self.read = len(self.ids)
        return rest
