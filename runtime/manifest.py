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


def _int_in(v, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


MANIFEST = "manifest.json"


def _state_entry_ok(s) -> bool:
    return all(isinstance(v, str) for v in (s.name, s.output, s.kind, s.dtype, s.init)) and \
        _int_in(s.layer, 0, 1 << 20) and isinstance(s.shape, list) and all(_int_in(d, 1, 1 << 40) for d in s.shape)


def _tensor_entry_ok(t) -> bool:
    return isinstance(t.name, str) and isinstance(t.dtype, str) and isinstance(t.shape, list) and \
        all(isinstance(d, str) or _int_in(d, 0, 1 << 40) for d in t.shape)


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
    files: dict[str, str] = field(default_factory=dict)   # graph file -> sha256 (runtime/integrity.py)
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SambaEdgeError(f"{path} is not valid JSON ({e}); re-export the artifact") from None
        except OSError as e:
            raise SambaEdgeError(f"{path} cannot be read ({e.strerror}); re-export the artifact") from None
        if not isinstance(d, dict):
            raise SambaEdgeError(f"{path} holds a JSON {type(d).__name__}, not a manifest object; re-export the artifact")
        if d.get("format_version") != FORMAT_VERSION:
            raise SambaEdgeError(f"{path} has format_version {d.get('format_version')!r}; this samba-edge reads "
                                 f"{FORMAT_VERSION}: re-export with this version")
        try:
            d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
            d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
            d["state"] = [StateSpec(**s) for s in d["state"]]
            m = cls(**d)
        except (KeyError, TypeError, AttributeError) as e:
            raise SambaEdgeError(f"{path} is incomplete or malformed ({e}); re-export the artifact") from None
        problem = m.problem()
        if problem:
            raise SambaEdgeError(f"{path}: {problem}; re-export the artifact (samba-edge export)")
        return m

    def problem(self) -> Optional[str]:
        """The first thing that is wrong with this table (types, ranges, and agreement with its own
        config: the state it lists is exactly the model's), or None."""
        from samba_edge.export.config import SambaConfig      # torch-free

        def plain_name(v) -> bool:
            return isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v

        def relative_inside(v) -> bool:
            return isinstance(v, str) and v != "" and not Path(v).is_absolute() and ".." not in Path(v).parts

        checks = [
            (self.flavor in ("plugin", "portable"), f"flavor {self.flavor!r} is not plugin or portable"),
            (self.dtype in ("float32", "float16", "int8"), f"dtype {self.dtype!r} is not float32, float16 or int8"),
            (self.logits in ("all", "last"), f"logits {self.logits!r} is not all or last"),
            (_int_in(self.opset, 18, 1000), f"opset {self.opset!r} is not an ONNX opset >= 18"),
            (_int_in(self.max_chunk, 1, 1 << 20), f"max_chunk {self.max_chunk!r} is not a chunk size"),
            (plain_name(self.onnx_file), f"onnx_file {self.onnx_file!r} is not a file name inside the artifact"),
            (self.kernels is None or relative_inside(self.kernels), f"kernels {self.kernels!r} leaves the artifact"),
            (self.tokenizer is None or plain_name(self.tokenizer), f"tokenizer {self.tokenizer!r} is not a file name"),
            (isinstance(self.fingerprint, str) and len(self.fingerprint) == 64, "fingerprint is not a sha256"),
            (isinstance(self.files, dict) and all(plain_name(k) and isinstance(v, str) for k, v in self.files.items()),
             "files is not a table of file names and digests"),
            (isinstance(self.model, dict), "model is not a config object"),
            (isinstance(self.special_tokens, dict) and all(
                isinstance(k, str) and (v is None or _int_in(v, 0, 1 << 31)) for k, v in self.special_tokens.items()),
             "special_tokens is not a table of token ids"),
            (isinstance(self.custom_ops, list) and all(isinstance(o, dict) for o in self.custom_ops),
             "custom_ops is not a list of op records"),
            (self.quantization is None or isinstance(self.quantization, dict), "quantization is not a record"),
            (self.source is None or isinstance(self.source, str), "source is not a path"),
            (isinstance(self.samba_edge_version, str), "samba_edge_version is not a string"),
            (isinstance(self.window, int) and not isinstance(self.window, bool), "window is not an integer"),
            (all(_state_entry_ok(x) for x in self.state), "a state entry has a field of the wrong type"),
            (all(_tensor_entry_ok(t) for t in [*self.inputs, *self.outputs]),
             "an input/output entry has a field of the wrong type"),
        ]
        bad = next((why for ok, why in checks if not ok), None)
        if bad:
            return bad
        try:
            cfg = SambaConfig.from_dict(self.model, source="its model config")
        except SambaEdgeError as e:
            return str(e)
        want = [(n, list(s[1:])) for n, s in cfg.state_shapes()]
        have = [(s.name, list(s.shape)) for s in self.state]
        if have != want or any(s.dtype != "float32" for s in self.state):
            return "its state table is not the model's (names, per-stream shapes, fp32)"
        if self.window != cfg.local_window:
            return f"window {self.window!r} is not the model's local_window {cfg.local_window}"
        head = [("input_ids", "int64", ["batch", "seq"]), ("start_pos", "int64", ["batch"])]
        if [(t.name, t.dtype, t.shape) for t in self.inputs[:2]] != head:
            return "its first inputs are not input_ids int64 [batch, seq] and start_pos int64 [batch]"
        if [t.name for t in self.inputs[2:]] != [s.name for s in self.state] or \
                [t.name for t in self.outputs[1:]] != [s.output for s in self.state] or \
                not self.outputs or self.outputs[0].name != "logits":
            return "its inputs/outputs are not input_ids, start_pos, the state, and logits + the next state"
        for t, s in zip(self.inputs[2:], self.state):
            if t.dtype != s.dtype or t.shape != ["batch", *s.shape]:
                return f"input {t.name} is {t.dtype} {t.shape}, but its state is {s.dtype} [batch, {s.shape}]"
        return None

    def check_signature(self, inputs: list, outputs: list, where: str) -> None:
        """The graph's real inputs/outputs ((name, numpy dtype or None, shape) triples; str dims are
        symbolic) against this table: names in order, dtypes, ranks and every fixed dim."""
        for kind, specs, real in (("input", self.inputs, inputs), ("output", self.outputs, outputs)):
            if [r[0] for r in real] != [t.name for t in specs]:
                raise SambaEdgeError(f"{where}: the graph's {kind}s {[r[0] for r in real][:4]}... are not the "
                                     f"manifest's {[t.name for t in specs][:4]}...: the graph does not belong to "
                                     "this manifest; re-export the artifact")
            for (name, dtype, shape), t in zip(real, specs):
                fixed = [d if isinstance(d, int) else None for d in t.shape]
                got = [d if isinstance(d, int) else None for d in shape]
                if (dtype is not None and dtype != t.dtype) or len(shape) != len(t.shape) or \
                        any(a is not None and b is not None and a != b for a, b in zip(fixed, got)):
                    raise SambaEdgeError(f"{where}: {kind} {name} is {dtype} {list(shape)} in the graph but "
                                         f"{t.dtype} {t.shape} in the manifest; re-export the artifact")

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
