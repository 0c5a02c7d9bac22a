"""manifest.json: the one table of an exported artifact. The exporter writes it; the engine builder,
the runtime and validate read it, and never re-derive graph facts from configs or tensor names.

It lists every graph input/output (name, dtype, shape with symbolic dims, dynamic axes), the
recurrent state tensors per layer (shape per stream, dtype, initial value, the output that carries
the next value), the window, the custom ops, the tokenizer and a fingerprint of the weights.
Torch-free.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class TensorSpec:
    name: str
    dtype: str                              # numpy dtype name: int64, float32, float16
    shape: list                             # ints, or symbolic names "batch" / "seq"
    dynamic_axes: dict = field(default_factory=dict)   # axis (as a string in JSON) -> symbolic name

    def __post_init__(self) -> None:
        self.dynamic_axes = {str(i): d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass
class StateSpec:
    name: str                               # graph input
    output: str                             # graph output carrying the next value
    layer: int
    kind: str                               # conv_state | ssm_state | k_window | v_window
    shape: list[int]                        # per stream (the batch axis 0 is omitted)
    dtype: str = "float32"
    init: str = "zeros"


@dataclass
class Manifest:
    model: dict[str, Any]                   # SambaConfig fields
    flavor: str                             # plugin | portable
    dtype: str                              # weights/activations: float32 | float16 | int8 (Q/DQ)
    opset: int
    max_chunk: int
    logits: str                             # all | last
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    state: list[StateSpec]
    fingerprint: str                        # sha256 of the weights (names, dtypes, shapes, bytes)
    window: int
    onnx_file: str = "model.onnx"
    source: Optional[str] = None            # the checkpoint it was exported from (validate's default reference)
    tokenizer: Optional[str] = None
    special_tokens: dict[str, Optional[int]] = field(default_factory=dict)
    custom_ops: list[dict[str, str]] = field(default_factory=list)
    quantization: Optional[dict] = None     # calibrate's record (method, data, which GEMMs are int8)
    kernels: Optional[str] = None           # kernels/kernels.json (AOT GPU kernels, plugin flavour), relative
    samba_edge_version: str = ""
    format_version: int = FORMAT_VERSION

    # ---- reading / writing ---------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise SambaEdgeError(f"{directory} is not an exported artifact (no {MANIFEST}); "
                                 "create one with `samba-edge export`") from None
        except json.JSONDecodeError as e:
            raise SambaEdgeError(f"{path} is not valid JSON ({e}); re-export the artifact") from None
        if d.get("format_version") != FORMAT_VERSION:
            raise SambaEdgeError(f"{path} has format_version {d.get('format_version')!r}; this samba-edge reads "
                                 f"{FORMAT_VERSION}: re-export with this version")
        try:
            d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
            d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
            d["state"] = [StateSpec(**s) for s in d["state"]]
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise SambaEdgeError(f"{path} is incomplete or malformed ({e}); re-export the artifact") from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    # ---- what the runtime needs -------------------------------------------------------------
    def empty_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros([batch, *s.shape], dtype=s.dtype) for s in self.state]

    def state_bytes(self, batch: int = 1) -> int:
        return sum(batch * math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in self.state)

    @property
    def vocab_size(self) -> int:
        return int(self.model["vocab_size"])
