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
from samba_edge.runtime.manifest import Manifest


class HostState:
    """The state protocol for backends whose state is a list of numpy arrays (batch on axis 0)."""

    def new_state(self, batch: int) -> list[np.ndarray]:
        return self.manifest.empty_state(batch)

    def stack_states(self, states: Sequence[list]) -> list[np.ndarray]:
        return [np.concatenate(parts) for parts in zip(*states)]

    def split_state(self, state: list, batch: int) -> list[list[np.ndarray]]:
        return [[x[i:i + 1] for x in state] for i in range(batch)]

    def state_to_host(self, state: list) -> list[np.ndarray]:
        return list(state)

    def state_from_host(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(x) for x in arrays]


class OrtBackend(HostState):
    """ONNX Runtime on an exported artifact; the plugin flavour runs the numpy op references."""

    name = "ort"

    def __init__(self, artifact: str | Path, threads: Optional[int] = None, providers: Optional[list] = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise SambaEdgeError("the ort backend needs onnxruntime: pip install onnxruntime") from None
        self.directory = Path(artifact)
        self.manifest = Manifest.load(self.directory)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        path = self.directory / self.manifest.onnx_file
        if self.manifest.flavor == "plugin":
            from samba_edge.plugins.ort_ops import plugin_session

            self.session = plugin_session(path, so, providers)
        else:
            self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        self._in = [t.name for t in self.manifest.inputs]
        self._out = [t.name for t in self.manifest.outputs]

    def run(self, input_ids: np.ndarray, start_pos: np.ndarray, state: Sequence[np.ndarray]):
        feed = dict(zip(self._in, [np.asarray(input_ids, np.int64), np.asarray(start_pos, np.int64), *state]))
        out = self.session.run(self._out, feed)
        if self.manifest.flavor == "plugin":
            from samba_edge.plugins.ort_ops import raise_op_error

            raise_op_error()
        return out[0], out[1:]
