"""Streams on a Triton Inference Server: the same shape as a local `Stream` (feed, feed_text,
generate_ids, generate_text, snapshot, close), each one a sequence of the server's sequence batcher.

    model = connect("127.0.0.1:8001", "samba", tokenizer="builtin:samba-tiny-py")
    s = model.new_stream()
    for piece in s.generate_text("def f(x):", SamplingParams(max_new_tokens=40)):
        print(piece, end="")
    s.close()                                   # END: the server drops the sequence

Each stream gets a fresh random correlation id and its own gRPC stream (Triton's bidirectional streaming
API: one open call per sequence, the correlation id also sent as the `x-samba-sequence` header for a sticky
load balancer); its first request carries START (a restored one also sends its snapshot). Models written by `samba-edge triton` with `--sampling server` answer every
request with the next token, drawn on the server with the request's settings from the sequence's own
generator (seeded as a local stream's), so a remote stream gives a local one's tokens, draw for draw;
with `--sampling client` the server returns logits and the client draws. Text is encoded and decoded
here, with a local tokenizer (the artifact's). Needs `pip install "tritonclient[grpc]"`.
"""
from __future__ import annotations

import collections
import queue
import secrets
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.sampling import SamplingParams, choose
from samba_edge.runtime.session import TextStream

SEQUENCE_HEADER = "x-samba-sequence"    # the correlation id again, for a load balancer to hash on (docs/serving.md)
CLIENT_HINT = 'the Triton client needs tritonclient: pip install "tritonclient[grpc]"'


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise SambaEdgeError(CLIENT_HINT) from None
    return grpcclient


def connect(url: str, name: str = "samba", tokenizer: Optional[str] = None, timeout: float = 30) -> "RemoteModel":
    """A model on a running server; `tokenizer`: a tokenizer file, or an artifact / checkpoint /
    builtin:NAME whose tokenizer to use (needed for text only)."""
    return RemoteModel(url, name, tokenizer, timeout)


class RemoteModel:
    def __init__(self, url: str, name: str, tokenizer: Optional[str] = None, timeout: float = 30) -> None:
        grpc = _grpc()
        from tritonclient.utils import InferenceServerException

        self.grpc, self.url, self.name, self.timeout = grpc, url, name, timeout
        self.Error = InferenceServerException
        try:
            self.client = grpc.InferenceServerClient(url)
            if not self.client.is_model_ready(name):
                raise SambaEdgeError(f"the server at {url} has no ready model {name!r}; its models: "
                                     f"{', '.join(m.name for m in self.client.get_model_repository_index().models)}")
            config = self.client.get_model_config(name).config
        except InferenceServerException as e:
            raise SambaEdgeError(f"cannot reach a Triton server at {url} ({e.message()}); start one with "
                                 "`samba-edge serve REPO`") from None
        outputs = {o.name: o for o in config.output}
        if "logits" not in outputs or config.sequence_batching is None:
            raise SambaEdgeError(f"model {name!r} at {url} is not a samba-edge model (no logits output or no "
                                 "sequence batcher); write one with `samba-edge triton`")
        self.vocab_size = int(outputs["logits"].dims[-1])
        self.server_sampling = "next_token" in outputs
        self.tokenizer = self._tokenizer(tokenizer) if tokenizer else None
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.vocab_size:
            raise SambaEdgeError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but {name!r} has a vocabulary "
                                 f"of {self.vocab_size}: it is not this model's tokenizer")

    @staticmethod
    def _tokenizer(where: str):
        from samba_edge.runtime.tokenizer import Tokenizer, load_tokenizer

        p = Path(where)
        if p.is_file():
            return Tokenizer(p)
        if where.startswith("builtin:") or p.is_dir():
            from samba_edge.export.locate import resolve

            return load_tokenizer(resolve(where) if where.startswith("builtin:") else p, None)
        raise SambaEdgeError(f"--tokenizer {where} not found; pass a tokenizer file, or the artifact/checkpoint "
                             "directory (or builtin:NAME) the served model came from")

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise SambaEdgeError("text needs a tokenizer: pass the served artifact (or its tokenizer file)")
        return self.tokenizer.encode(text)

    def new_stream(self, seed: int = 0) -> "RemoteStream":
        return RemoteStream(self, seed)

    def restore(self, path: str | Path) -> "RemoteStream":
        s = RemoteStream(self, 0)
        s._snapshot_in = Path(path).read_bytes()
        return s

    def tensors(self, ids, extra: dict) -> list:
        g = self.grpc
        a = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        tensors = [g.InferInput("input_ids", list(a.shape), "INT64")]
        tensors[0].set_data_from_numpy(a)
        for name, (dtype, value) in extra.items():
            t = g.InferInput(name, [1, 1], dtype)
            t.set_data_from_numpy(np.array([[value]], dtype={"FP32": np.float32, "INT32": np.int32,
                                                             "INT64": np.int64, "BOOL": bool,
                                                             "BYTES": np.object_}[dtype]))
            tensors.append(t)
        return tensors


class _SequenceChannel:
    """One gRPC bidirectional stream per sequence (Triton's streaming API): its requests go out on one
    open call instead of one call each; answers come back through a queue."""

    def __init__(self, model: RemoteModel, corrid: int) -> None:
        self.model, self.corrid, self.answers = model, corrid, queue.Queue()
        self.client = model.grpc.InferenceServerClient(model.url)
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)),
                                 headers={SEQUENCE_HEADER: str(corrid)})

    def request(self, ids, start: bool, end: bool, extra: dict, outputs: list[str]):
        m, g = self.model, self.model.grpc
        self.client.async_stream_infer(m.name, m.tensors(ids, extra), outputs=[g.InferRequestedOutput(o) for o in outputs],
                                       sequence_id=self.corrid, sequence_start=start, sequence_end=end)
        try:
            result, error = self.answers.get(timeout=m.timeout)
        except queue.Empty:
            raise SambaEdgeError(f"no answer from {m.url} within {m.timeout:g} s") from None
        if error is not None:
            msg = error.message() if hasattr(error, "message") else str(error)
            raise SambaEdgeError(f"the server refused the request: {msg}")
        return result

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


class RemoteStream(TextStream):
    """One sequence on the server. Thread-compatible (one caller at a time per stream)."""

    def __init__(self, model: RemoteModel, seed: int = 0) -> None:
        self.model, self.seed = model, seed
        self.corrid = secrets.randbits(63) or 1
        self.position, self.started, self.closed = 0, False, False
        self.last_logits: Optional[np.ndarray] = None
        self._next: Optional[tuple] = None           # (settings, token) the server drew after the last request
        self._snapshot_in: Optional[bytes] = None
        self.params: Optional[SamplingParams] = None     # what feed's requests draw with (server sampling)
        self._channel: Optional[_SequenceChannel] = None
        self.rng = np.random.default_rng(seed)       # client sampling only
        self.recent: collections.deque = collections.deque(maxlen=4096)

    def _request(self, ids, params: Optional[SamplingParams] = None, end: bool = False, snapshot: bool = False,
                 draw: bool = False, reseed: bool = False, logits: bool = True):
        """One request. draw (server sampling): the answer carries the next token, drawn with `params` (it
        advances the server's generator exactly as a local stream's draw does); reseed: params.seed first
        restarts the generator (as a local generate_ids with a seed does); logits: fetch them (32K floats a token
        at full size; generation with server sampling does without)."""
        if self.closed:
            raise SambaEdgeError("this remote stream is closed")
        m = self.model
        extra: dict = {}
        p = params or SamplingParams()
        if m.server_sampling:
            extra.update(temperature=("FP32", p.temperature), top_k=("INT32", p.top_k), top_p=("FP32", p.top_p),
                         repetition_penalty=("FP32", p.repetition_penalty))
        fresh = not self.started and self._snapshot_in is None
        if fresh or (reseed and p.seed is not None):           # a restored stream keeps its snapshot's generator
            seed = p.seed if p.seed is not None else self.seed
            if m.server_sampling:
                extra["seed"] = ("INT64", seed)
            else:
                self.rng = np.random.default_rng(seed)
        if not self.started:
            if self._snapshot_in is not None:
                extra["snapshot_in"] = ("BYTES", self._snapshot_in)
        if snapshot:
            extra["want_snapshot"] = ("BOOL", True)
        draw = draw and m.server_sampling
        logits = logits or not m.server_sampling
        outputs = ["position"] + (["logits"] if logits else []) + (["next_token"] if draw else []) + \
            (["snapshot"] if snapshot else [])
        if self._channel is None:
            self._channel = _SequenceChannel(m, self.corrid)
        r = self._channel.request(ids, not self.started, end, extra, outputs)
        self.started, self._snapshot_in = True, None
        self.position = int(r.as_numpy("position").reshape(-1)[0])
        self.last_logits = r.as_numpy("logits").reshape(-1)[: m.vocab_size].astype(np.float32) if logits else None
        self.recent.extend(int(i) for i in ids)
        if draw:
            self._next = (_key(p, reseed), int(r.as_numpy("next_token").reshape(-1)[0]))
        elif len(ids):
            self._next = None                        # fed without a draw: nothing drawn for the new state
        return r

    def feed(self, ids, params: Optional[SamplingParams] = None) -> np.ndarray:
        from samba_edge.runtime.userio import token_ids

        a = token_ids(ids, self.model.vocab_size)
        if a.size == 0:
            raise SambaEdgeError("nothing to feed: the token list is empty")
        params = params or self.params
        self._request(a, params, draw=params is not None, reseed=True)
        return self.last_logits

    def generate_text(self, prompt: Optional[str], params: SamplingParams) -> Iterator[str]:
        self.params = params                        # the prompt's request draws with these settings already
        return super().generate_text(prompt, params)

    def generate_ids(self, params: SamplingParams) -> Iterator[int]:
        if not self.started and self._snapshot_in is None:
            raise SambaEdgeError("feed a prompt before generating")
        stop_ids = set(params.stop_token_ids)
        eos = self.model.tokenizer.eos_id if self.model.tokenizer is not None else None
        for i in range(params.max_new_tokens):
            tok = self._draw(params, first=i == 0)
            if tok == eos or tok in stop_ids:
                return
            # the last token is fed without a draw: a local stream draws only when it chooses a token
            self._request([tok], params, draw=i < params.max_new_tokens - 1, logits=False)
            yield tok

    def _draw(self, params: SamplingParams, first: bool) -> int:
        """The next token: drawn here (client sampling), or the one the server drew with the last request
        (server sampling; a zero-token request draws one when there is none for these settings)."""
        if not self.model.server_sampling:
            if self.last_logits is None:
                self._request([], params)
            if first and params.seed is not None:
                self.rng = np.random.default_rng(params.seed)
            recent = list(self.recent)[-params.repetition_window:]
            return choose(self.last_logits, params, self.rng, recent)
        if self._next is None or self._next[0] != _key(params, first):
            self._request([], params, draw=True, reseed=first, logits=False)
        token, self._next = self._next[1], None
        return token

    def snapshot(self, path: str | Path) -> Path:
        """The server-side stream's snapshot (a samba-edge snapshot file, written atomically)."""
        import os

        from samba_edge.runtime.atomic import atomic_file

        r = self._request([], snapshot=True, logits=False)
        data = bytes(r.as_numpy("snapshot").reshape(-1)[0])
        path = Path(path)
        tmp = atomic_file(path)
        try:
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def close(self) -> None:
        """END: the server drops the sequence now (not at its idle timeout)."""
        try:
            if self.started and not self.closed:
                self._request([], end=True, logits=False)
        finally:
            self.closed = True
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def __del__(self) -> None:                      # an abandoned stream still ends its gRPC call
        if getattr(self, "_channel", None) is not None:
            try:
                self._channel.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


def _key(p: SamplingParams, reseeded: bool) -> tuple:
    """What a drawn token depends on (a draw after a reseed only serves a generate_ids that reseeds)."""
    return (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed if reseeded else None)
