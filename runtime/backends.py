"""Backends: one small interface over every way of running the step graph (as Polygraphy's runners).

    backend.manifest                       the artifact's table (inputs, outputs, state)
    backend.run(input_ids, start_pos, state) -> (logits, next_state)      logits numpy
Backends keep no stream state: streams own it. What a state IS belongs to the backend: a list of
numpy arrays in manifest order here (`HostState`), device buffers for TensorRT (runtime/trt_backend.py).
Streams only touch it through new_state / stack_states / split_state / state_to_host / state_from_host,
so a device-resident state never makes a host round trip except for snapshots.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.integrity import verify
from samba_edge.runtime.manifest import Manifest


class HostState:
    """The state protocol for backends whose state is a list of numpy arrays (batch on axis 0)."""

    def new_state(self, batch: int) -> list[np.ndarray]:
        return self.manifest.empty_state(batch)

    def stack_states(self, states: Sequence[list]) -> list[np.ndarray]:
        return [np.concatenate(parts) for parts in zip(*states)]

    def split_state(self, state: list, batch: int) -> list[list[np.ndarray]]:
        return [[x[i:i + 1] for x in state] for i in range(batch)]

    def state_to_host(self, state: list, position=None) -> list[np.ndarray]:
        """The state in the manifest's layout (what snapshots store); `position`: each row's next position."""
        return list(state)

    def state_from_host(self, arrays: Sequence[np.ndarray], position=None) -> list[np.ndarray]:
        return [np.ascontiguousarray(x) for x in arrays]

    def run_host(self, input_ids: np.ndarray, start_pos: np.ndarray, state: Sequence[np.ndarray]):
        """`run` on state in the manifest's layout, in and out, whatever layout the backend keeps (validate)."""
        pos = np.asarray(start_pos, np.int64)
        logits, new = self.run(input_ids, pos, self.state_from_host(state, pos))
        return logits, self.state_to_host(new, pos + np.shape(input_ids)[1])


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(double)": "float64"}


def ort_disabled_optimizers(manifest: Manifest) -> list[str]:
    """Graph optimisations the runtime (and validate, which runs what the runtime runs) switches off. int8:
    common subexpression elimination would merge the per-GEMM activation Q/DQ pairs calibrate writes back
    into shared ones, and a shared DequantizeLinear blocks the fusion into integer GEMMs."""
    return ["CommonSubexpressionElimination"] if manifest.dtype == "int8" else []


def _ort_arg(a) -> tuple:
    return a.name, _ORT_TYPES.get(a.type, a.type), list(a.shape or [])


class OrtBackend(HostState):
    """ONNX Runtime on an exported artifact. A plugin-flavour graph runs its samba.* ops through their
    standard-op bodies (ops="bodies": the portable flavour's speed) or the numpy references ("reference").

    With the bodies the attention windows are kept as rings (plugins/onnx_bodies.swa_ring_function): the
    graph returns only each chunk's new keys/values and `run` writes them into the window arrays it was
    given, in place (slot p mod (W-1) holds position p), so a step moves O(new rows) of window state, not
    O(window). Such a state belongs to this backend: snapshots and other backends get the manifest's
    layout through state_to_host / state_from_host (which rotate the windows by the position)."""

    name = "ort"

    def __init__(self, artifact: str | Path, threads: Optional[int] = None, providers: Optional[list] = None,
                 ops: str = "bodies", prepack: bool = True) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise SambaEdgeError("the ort backend needs onnxruntime: pip install onnxruntime") from None
        self.directory = Path(artifact)
        self.manifest = Manifest.load(self.directory)
        verify(self.directory, self.manifest)        # small artifacts: their graph files are the ones written
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if not prepack:                  # a second, packed copy of every GEMM weight: speed for memory
            so.add_session_config_entry("session.disable_prepacking", "1")
        path = self.directory / self.manifest.onnx_file
        if not path.is_file():
            raise SambaEdgeError(f"{self.directory} has a manifest but no {self.manifest.onnx_file}; re-export it")
        try:
            if self.manifest.flavor == "plugin":
                from samba_edge.plugins.ort_ops import plugin_session

                self.session = plugin_session(path, so, providers, ops=ops, ring=bool(ring_states(self.manifest, ops)),
                                              disabled_optimizers=ort_disabled_optimizers(self.manifest))
            else:
                self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"],
                                                    disabled_optimizers=ort_disabled_optimizers(self.manifest))
        except SambaEdgeError:
            raise
        except Exception as e:  # noqa: BLE001 - ORT raises its own types for unloadable graphs
            first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise SambaEdgeError(f"ONNX Runtime cannot load {path} ({first}); is it truncated or not a samba-edge "
                                 "graph? re-export the artifact") from None
        self.manifest.check_signature([_ort_arg(a) for a in self.session.get_inputs()],
                                      [_ort_arg(a) for a in self.session.get_outputs()], str(path))
        self._in = [t.name for t in self.manifest.inputs]
        self._out = [t.name for t in self.manifest.outputs]
        self._references = self.manifest.flavor == "plugin" and ops == "reference"
        self._rings = ring_states(self.manifest, ops)

    def run(self, input_ids: np.ndarray, start_pos: np.ndarray, state: Sequence[np.ndarray]):
        feed = dict(zip(self._in, [np.asarray(input_ids, np.int64), np.asarray(start_pos, np.int64), *state]))
        out = self.session.run(self._out, feed)
        if self._references:
            from samba_edge.plugins.ort_ops import raise_op_error

            raise_op_error()
        new = out[1:]
        if self._rings:
            pos = np.asarray(start_pos, np.int64)
            for i in self._rings:
                new[i] = _write_rows(state[i], new[i], pos)
        return out[0], new

    # ring windows <-> the manifest's layout (slot j = position p - (W-1) + j)
    def _rotate(self, state, position, sign: int) -> list[np.ndarray]:
        out = [np.ascontiguousarray(x) for x in state]
        if not self._rings:
            return out
        if position is None:
            raise SambaEdgeError("this backend keeps windows as rings: converting its state needs the position")
        pos = np.broadcast_to(np.asarray(position, np.int64), (len(out[0]),))
        for i in self._rings:
            C = out[i].shape[2]
            out[i] = np.stack([np.roll(row, sign * int(p % C), axis=1) for row, p in zip(out[i], pos)])
        return out

    def state_to_host(self, state: list, position=None) -> list[np.ndarray]:
        return self._rotate(state, position, -1)

    def state_from_host(self, arrays: Sequence[np.ndarray], position=None) -> list[np.ndarray]:
        return self._rotate(arrays, position, +1)


def ring_states(manifest: Manifest, ops: str = "bodies") -> list[int]:
    """Which state tensors OrtBackend keeps as rings (their graph outputs are then the chunk's rows)."""
    ring = manifest.flavor == "plugin" and ops == "bodies"
    return [i for i, s in enumerate(manifest.state) if ring and s.kind in ("k_window", "v_window")]


def _write_rows(ring: np.ndarray, rows: np.ndarray, start_pos: np.ndarray) -> np.ndarray:
    """Write a chunk's keys/values rows (b, G, T, hs), at positions start_pos + t, into the ring (b, G, C, hs)
    in place (slot = position mod C; only the last C rows can survive); returns the ring."""
    C, T = ring.shape[2], rows.shape[2]
    n = min(T, C)
    for b, p in enumerate(start_pos):
        slots = (int(p) + np.arange(T - n, T)) % C
        ring[b][:, slots] = rows[b][:, T - n:]
    return ring
