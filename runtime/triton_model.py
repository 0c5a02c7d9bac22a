"""The Triton Inference Server python-backend model: samba-edge's runtime behind a sequence batcher.

A repository written by `samba-edge triton --backend python` holds `1/model.py`, which is one line:
`from samba_edge.runtime.triton_model import TritonPythonModel`. The server runs it in its python stub
(an environment with numpy<2, samba-edge and the artifact's backend; docs/serving.md).

Why the model keeps the state itself: the python backend accepts a `state` section in config.pbtxt but
ignores it (every request would see the initial zeros). So each sequence (CORRID) owns one runtime
`Stream`: START makes a fresh one (a reused id starts over), END drops it after its answer, and a stream
idle for longer than `idle_seconds` is dropped (as the sequence batcher forgets the sequence). The
requests of one `execute` (distinct sequences, delivered by the `oldest` strategy) that feed the same
number of tokens advance in ONE `Model.step`. A bad request gets an error response naming the problem;
it never takes the model down, and the other requests of the batch are answered normally.

Request inputs (batch axis first, one row): input_ids INT64 [n] (the prompt, a chunk of it, or the last
token; any n; 0 later on: nothing fed, e.g. to draw again with other settings, snapshot or END), optional sampling scalars temperature / top_k / top_p / repetition_penalty / seed (on START the
stream's seed; later, the generator restarts from it before the draw, as a local generate_ids' seed), snapshot_in BYTES [1] (a samba-edge snapshot to continue from,
on START), want_snapshot BOOL [1]. Outputs: logits FP32 [V] (the last position's), next_token INT64 [1]
(drawn from them with the request's settings and the stream's generator, only when requested:
`--sampling server`),
position INT64 [1] (tokens the stream holds), live_sequences INT32 [1], snapshot BYTES [1] (when asked).
"""
from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError

SAMPLING_INPUTS = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}


def _param(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class SequenceError(SambaEdgeError):
    """A problem with one request; answered as that request's error."""


class TritonPythonModel:
    # ---- life cycle -------------------------------------------------------------------------
    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        from samba_edge.runtime.session import open_model

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        here = Path(args["model_repository"]) / args["model_version"]
        artifact = Path(_param(config, "artifact", "artifact"))
        artifact = artifact if artifact.is_absolute() else here / artifact
        threads = int(_param(config, "threads", "0")) or None
        self.model = open_model(str(artifact), _param(config, "runtime_backend", "auto"), threads)
        self.idle_seconds = float(_param(config, "idle_seconds", "60"))
        self.sampling = _param(config, "sampling", "server")
        self.streams: dict[int, object] = {}
        self.last_used: dict[int, float] = {}
        self.lock = threading.Lock()
        self.tmp = tempfile.TemporaryDirectory(prefix="samba-edge-triton-")
        self.closing = threading.Event()
        self.sweeper = threading.Thread(target=self._sweep_loop, daemon=True)
        self.sweeper.start()

    def finalize(self) -> None:
        self.closing.set()
        with self.lock:
            self.streams.clear()
        self.tmp.cleanup()

    def _sweep_loop(self) -> None:
        while not self.closing.wait(min(1.0, self.idle_seconds / 4)):
            self._sweep()

    def _sweep(self) -> None:
        """Forget sequences idle for longer than idle_seconds (the batcher has forgotten them too)."""
        now = time.monotonic()
        with self.lock:                 # chosen and dropped under one lock: a START in between is not dropped
            for corrid in [c for c, t in self.last_used.items() if now - t > self.idle_seconds]:
                self.streams.pop(corrid, None)
                self.last_used.pop(corrid, None)

    # ---- requests ---------------------------------------------------------------------------
    def _input(self, request, name: str) -> Optional[np.ndarray]:
        t = self.pb.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    def _flag(self, request, name: str) -> bool:
        a = self._input(request, name)
        return a is not None and bool(np.asarray(a).reshape(-1)[0])

    def _parse(self, request) -> dict:
        """One request -> what to do, every field checked; SequenceError names the problem."""
        from samba_edge.runtime.sampling import SamplingParams
        from samba_edge.runtime.userio import token_ids

        corrid_a = self._input(request, "CORRID")
        if corrid_a is None:
            raise SequenceError("no correlation id: send each request with a sequence_id (CORRID)")
        corrid = int(np.asarray(corrid_a).reshape(-1)[0])
        ids = self._input(request, "input_ids")
        if ids is None:
            raise SequenceError("input_ids is missing: send the tokens to feed (INT64)")
        if ids.dtype != np.int64:
            raise SequenceError(f"input_ids is {ids.dtype}; send INT64 token ids")
        job = {"corrid": corrid, "start": self._flag(request, "START"), "end": self._flag(request, "END"),
               "ids": token_ids(ids.reshape(-1), self.model.vocab_size, "input_ids"),
               "want_snapshot": self._flag(request, "want_snapshot"), "snapshot_in": None, "seed": None}
        kw = {}
        for name, kind in SAMPLING_INPUTS.items():
            a = self._input(request, name)
            if a is not None:
                kw[name] = kind(np.asarray(a).reshape(-1)[0])
        seed = self._input(request, "seed")
        if seed is not None:
            job["seed"] = int(np.asarray(seed).reshape(-1)[0])
        try:
            job["params"] = SamplingParams(**kw, seed=job["seed"])
        except SambaEdgeError as e:                    # named as the request input, not the CLI flag
            msg = str(e)
            for flag in ("--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed"):
                msg = msg.replace(flag, flag[2:].replace("-", "_"))
            raise SequenceError(msg) from None
        snap = self._input(request, "snapshot_in")
        if snap is not None:
            if not job["start"]:
                raise SequenceError("snapshot_in continues a sequence from a snapshot: send it with START")
            job["snapshot_in"] = bytes(np.asarray(snap, dtype=object).reshape(-1)[0])
        if not job["start"] and corrid not in self.streams:
            raise SequenceError(f"sequence {corrid} has no stream: its first request needs START (or it ended, "
                                f"or it was idle for more than {self.idle_seconds:g} s)")
        if job["ids"].size == 0 and job["start"] and job["snapshot_in"] is None:
            raise SequenceError("input_ids is empty: a sequence's first request feeds at least one token")
        return job

    def _open(self, job: dict):
        """The job's stream: a fresh (or restored) one on START, else the sequence's own."""
        corrid = job["corrid"]
        if not job["start"]:
            return self.streams[corrid]
        if job["snapshot_in"] is not None:
            path = Path(self.tmp.name) / f"in-{corrid}.safetensors"
            path.write_bytes(job["snapshot_in"])
            try:
                stream = self.model.restore(path)
            finally:
                path.unlink(missing_ok=True)
        else:
            stream = self.model.new_stream(seed=job["seed"] or 0)     # later seeds restart it before a draw
        with self.lock:
            self.streams[corrid] = stream
        return stream

    def execute(self, requests):
        self._sweep()
        answers: list = [None] * len(requests)
        jobs = {}
        for i, request in enumerate(requests):
            try:
                job = self._parse(request)
                job["stream"] = self._open(job)
                jobs[i] = job
            except SambaEdgeError as e:
                answers[i] = str(e)
            except Exception as e:  # noqa: BLE001 - one request's fault is that request's answer
                answers[i] = f"internal error: {type(e).__name__}: {e}"
        self._advance(jobs, answers)
        return [self._respond(requests[i], jobs.get(i), a) for i, a in enumerate(answers)]

    def _advance(self, jobs: dict, answers: list) -> None:
        """Feed every job's tokens: jobs with the same token count (within one chunk) in one batched step."""
        groups: dict[int, list[int]] = {}
        for i, job in jobs.items():
            n = job["ids"].size
            if n:
                groups.setdefault(n if n <= self.model.max_chunk else -i - 1, []).append(i)
        for n, members in groups.items():
            members.sort(key=lambda i: jobs[i]["corrid"])     # a stable order: the same batch again is not re-stacked
            try:
                if len(members) > 1:
                    self.model.step([jobs[i]["stream"] for i in members], [jobs[i]["ids"] for i in members])
                else:
                    jobs[members[0]]["stream"].feed(jobs[members[0]]["ids"])
            except SambaEdgeError as e:
                for i in members:
                    answers[i] = str(e)
            except Exception as e:  # noqa: BLE001
                for i in members:
                    answers[i] = f"internal error: {type(e).__name__}: {e}"

    def _respond(self, request, job: Optional[dict], error: Optional[str]):
        pb = self.pb
        if error is not None or job is None:
            if job is not None and job["start"]:                # a failed first request leaves no stream
                self._drop(job["corrid"])
            return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(error or "request not run"))
        stream, corrid = job["stream"], job["corrid"]
        wanted = set(request.requested_output_names()) or {"logits", "next_token", "position", "live_sequences",
                                                            "snapshot"}
        try:
            out = []
            if stream.last_logits is None:
                raise SequenceError("the restored snapshot holds no logits; send input_ids with it")
            if "logits" in wanted:
                out.append(pb.Tensor("logits", stream.last_logits[None].astype(np.float32)))
            if "next_token" in wanted and self.sampling == "server":
                from samba_edge.runtime.sampling import choose

                params = job["params"]
                if job["seed"] is not None and (not job["start"] or job["snapshot_in"] is not None):
                    stream.rng = np.random.default_rng(job["seed"])
                recent = list(stream.recent)[-params.repetition_window:]
                out.append(pb.Tensor("next_token", np.array([[choose(stream.last_logits, params, stream.rng, recent)]],
                                                            dtype=np.int64)))
            if "position" in wanted:
                out.append(pb.Tensor("position", np.array([[stream.position]], dtype=np.int64)))
            if job["want_snapshot"] and "snapshot" in wanted:
                path = Path(self.tmp.name) / f"out-{corrid}.safetensors"
                try:
                    stream.snapshot(path)
                    out.append(pb.Tensor("snapshot", np.array([[path.read_bytes()]], dtype=np.object_)))
                finally:
                    path.unlink(missing_ok=True)
        except SambaEdgeError as e:
            return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(e)))
        if job["end"]:
            self._drop(corrid)
        else:
            with self.lock:
                self.last_used[corrid] = time.monotonic()
        if "live_sequences" in wanted:
            out.append(pb.Tensor("live_sequences", np.array([[len(self.streams)]], dtype=np.int32)))
        return pb.InferenceResponse(output_tensors=out)

    def _drop(self, corrid: int) -> None:
        with self.lock:
            self.streams.pop(corrid, None)
            self.last_used.pop(corrid, None)
