"""`samba-edge export`: a checkpoint -> an artifact directory (model.onnx + manifest.json + tokenizer).

ONE step graph serves prefill chunks and single-token decode:
    inputs   input_ids int64 [batch, seq], start_pos int64 [batch], every layer's state (fp32)
    outputs  logits fp32 [batch, seq|1, padded_vocab], every layer's next state ("<name>.out")
Batch and seq are dynamic; the window state has a fixed length W-1, so no shape ever grows.
Both flavours come from one trace: `plugin` keeps the samba.* custom nodes; `portable` inlines
their standard-op bodies (export/onnx_ops.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import warnings
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Optional

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.manifest import Manifest, StateSpec, TensorSpec

FLAVORS = ("plugin", "portable")
DTYPES = {"fp32": "float32", "fp16": "float16"}    # --dtype -> manifest dtype (int8 comes from `calibrate`)
MIN_OPSET, DEFAULT_OPSET = 18, 18
EXTERNAL_DATA_BYTES = 256 * 2**20           # larger weights go to model.onnx.data (protobuf caps at 2 GiB)
SCOPE_KEY = "pkg.torch.onnx.name_scopes"     # node metadata: the nn.Module path that produced the node


def _source(checkpoint: str) -> str:
    return checkpoint if checkpoint.startswith("builtin:") else str(Path(checkpoint).resolve())


def weights_fingerprint(state_dict) -> str:
    """sha256 over sorted (name, dtype, shape, bytes); a tied head (the embedding's tensor) counted once."""
    import torch

    h = hashlib.sha256()
    wte = state_dict.get("transformer.wte.weight")
    for k in sorted(state_dict):
        if k == "lm_head.weight" and state_dict[k] is wte:
            continue
        t = state_dict[k].detach().contiguous().cpu()
        h.update(f"{k}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_large(proto) -> bool:
    return sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_BYTES


def save_onnx(proto, path: Path) -> None:
    """model.onnx, with the weights in model.onnx.data beside it when they are large."""
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=is_large(proto), all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def build_manifest(cfg, flavor: str, opset: int, max_chunk: int, logits: str, fingerprint: str,
                   tokenizer: Optional[str], special: dict, source: Optional[str] = None,
                   dtype: str = "float32") -> Manifest:
    state = []
    for name, shape in cfg.state_shapes(1):
        kind, layer = name.split(".")
        state.append(StateSpec(name=name, output=f"{name}.out", layer=int(layer), kind=kind, shape=list(shape[1:])))
    inputs = [TensorSpec("input_ids", "int64", ["batch", "seq"]), TensorSpec("start_pos", "int64", ["batch"])]
    inputs += [TensorSpec(s.name, s.dtype, ["batch", *s.shape]) for s in state]
    outputs = [TensorSpec("logits", "float32", ["batch", "seq" if logits == "all" else 1, cfg.padded_vocab_size])]
    outputs += [TensorSpec(s.output, s.dtype, ["batch", *s.shape]) for s in state]
    custom = [{"name": op, "domain": "samba", "plugin_version": "1", "plugin_namespace": "samba"}
              for op in ("SelectiveScan", "SlidingWindowAttention")] if flavor == "plugin" else []
    return Manifest(model=cfg.to_dict(), flavor=flavor, dtype=dtype, opset=opset, max_chunk=max_chunk,
                    logits=logits, inputs=inputs, outputs=outputs, state=state, fingerprint=fingerprint,
                    window=cfg.local_window, tokenizer=tokenizer, special_tokens=special, custom_ops=custom,
                    samba_edge_version=pkg_version("samba-edge"), source=source)


def _step_module(model, last_only: bool):
    """An nn.Module with the graph's argument layout (the state as one list)."""
    import torch

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, start_pos, state):
            return self.model(input_ids, start_pos, *state, last_only=last_only)

    return Step()


def trace_onnx(model, flavor: str, opset: int, max_chunk: int, last_only: bool):
    """torch.onnx.export(dynamo=True) with the custom ops translated to samba.* nodes."""
    import onnx_ir as ir
    import torch

    from samba_edge.export.onnx_ops import to_portable, translation_table

    cfg = model.config
    names = [n for n, _ in cfg.state_shapes(1)]
    b, t = 2, 3                                                   # > 1, so neither axis specialises
    args = (torch.zeros(b, t, dtype=torch.long), torch.zeros(b, dtype=torch.long), model.empty_state(b))
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=max(max_chunk, 2))
    dyn = {"input_ids": {0: batch, 1: seq}, "start_pos": {0: batch}, "state": [{0: batch} for _ in names]}
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(_step_module(model, last_only), args, dynamo=True, dynamic_shapes=dyn, opset_version=opset,
                                 custom_translation_table=translation_table(cfg), optimize=True, verbose=False,
                                 input_names=["input_ids", "start_pos", *names],
                                 output_names=["logits", *[f"{n}.out" for n in names]])
    model_ir = prog.model
    for node in model_ir.graph:                  # keep only the module scope (validate --bisect uses it):
        scopes = node.metadata_props.get(SCOPE_KEY)   # stack traces would leak local paths into artifacts
        node.metadata_props.clear()
        if scopes is not None:
            node.metadata_props[SCOPE_KEY] = scopes
    if flavor == "portable":
        half = model.transformer.h[1].attn.attn.weight.dtype == torch.float16 if cfg.n_layer > 1 else False
        to_portable(model_ir, cfg, opset, half=half)
    model_ir.producer_name, model_ir.producer_version = "samba-edge", pkg_version("samba-edge")
    return ir.serde.serialize_model(model_ir)


class _quiet_exporter:
    """The dynamo exporter logs progress with emoji at INFO/print level; keep the CLI's output ours."""

    def __enter__(self):
        import contextlib
        import io

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        logging.disable(logging.NOTSET)
        self._redirect.__exit__(*exc)


def export_onnx(checkpoint: str, out: str | Path, flavor: str = "plugin", config: Optional[str] = None,
                max_chunk: int = 256, opset: int = DEFAULT_OPSET, logits: str = "all", force: bool = False,
                tokenizer: Optional[str] = None, dtype: str = "fp32", kernel_archs: Optional[str] = None) -> Path:
    """Public entry of `samba-edge export`. Writes atomically: OUTDIR appears complete or not at all.

    dtype fp16: weights and GEMMs in fp16, the casts explicit in the graph (strongly typed); the scan,
    delta/dt_proj/softplus/exp, A, D, every state tensor, norm statistics, RoPE phases, softmax and the
    residual stream stay fp32 (export/model.py decides each, the custom ops' schemas enforce the scan's).
    kernel_archs (plugin flavour): the GPU archs to compile kernels for, plugins.aot.requested_archs."""
    import shutil

    import onnx

    from samba_edge.export.checkpoint import load_checkpoint
    from samba_edge.runtime.atomic import atomic_dir, check_output
    from samba_edge.export.onnx_ops import register_schemas
    from samba_edge.runtime.integrity import digests
    from samba_edge.runtime.tokenizer import find_tokenizer, load_tokenizer

    if flavor not in FLAVORS:
        raise SambaEdgeError(f"unknown flavour {flavor!r}; use one of: {', '.join(FLAVORS)}")
    if dtype not in DTYPES:
        raise SambaEdgeError(f"unknown --dtype {dtype!r}; use one of: {', '.join(DTYPES)} "
                             "(for int8, export fp32 and run `samba-edge calibrate`)")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset > onnx.defs.onnx_opset_version():
        raise SambaEdgeError(f"--opset {opset!r}: this onnx {onnx.__version__} knows opsets up to "
                             f"{onnx.defs.onnx_opset_version()}; use --opset {DEFAULT_OPSET} (the default)")
    if opset < MIN_OPSET:
        raise SambaEdgeError(f"opset {opset} is too old for the ops this graph uses (Scan/Softmax/Range with "
                             f"dynamic shapes via the dynamo exporter); use --opset {MIN_OPSET} or newer")
    if max_chunk < 1:
        raise SambaEdgeError(f"--max-chunk must be >= 1, got {max_chunk}")
    if logits not in ("all", "last"):
        raise SambaEdgeError(f"--logits must be 'all' or 'last', got {logits!r}")
    if kernel_archs is not None and flavor != "plugin":
        raise SambaEdgeError("--kernel-archs is for the plugin flavour (the portable one ships no GPU kernels)")
    archs = None
    if flavor == "plugin" and importlib.util.find_spec("triton") is not None:   # AOT GPU kernels
        from samba_edge.plugins.aot import ARCHS, requested_archs

        archs = requested_archs(kernel_archs)
        which = "every GPU arch" if archs == sorted(ARCHS) else ", ".join(f"sm_{a}" for a in archs)
    out = Path(out)
    check_output(out, force)
    ckpt = load_checkpoint(checkpoint, config)
    tok_path = (load_tokenizer(tokenizer=tokenizer).path if tokenizer else find_tokenizer(ckpt.directory))
    special = {}
    tok_name = None
    if tok_path is not None:
        from samba_edge.export.checkpoint import tokenizer_name

        tok_name = tokenizer_name(tok_path)          # stored under its canonical name, as the runtime finds it
        tok = load_tokenizer(tokenizer=tok_path)
        special = {"bos": tok.bos_id, "eos": tok.eos_id}
    import torch

    model = ckpt.model(torch.float16 if dtype == "fp16" else torch.float32)
    from samba_edge.runtime.progress import stage

    with stage(f"tracing {checkpoint} to ONNX ({flavor}, {dtype})"):
        proto = trace_onnx(model, flavor, opset, max_chunk, logits == "last")
    made = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if made != opset:                  # the manifest records what the graph is, never what was asked
        raise SambaEdgeError(f"--opset {opset}: the exporter produced opset {made} instead; use --opset {made}")
    register_schemas()
    manifest = build_manifest(model.config, flavor, opset, max_chunk, logits, weights_fingerprint(ckpt.state_dict),
                              tok_name, special, source=_source(checkpoint),
                              dtype=DTYPES[dtype])
    onnx.helper.set_model_props(proto, {"samba_edge.fingerprint": manifest.fingerprint, "samba_edge.flavor": flavor,
                                        "samba_edge.dtype": manifest.dtype})
    with atomic_dir(out, force) as tmp:
        save_onnx(proto, tmp / "model.onnx")
        onnx.checker.check_model(str(tmp / "model.onnx"), full_check=True)
        manifest.files = digests(tmp, "model.onnx")
        if archs is not None:
            from samba_edge.plugins.aot import INDEX, KERNELS_DIR, write_kernels

            with stage(f"compiling the plugin kernels for {which} (cached)"):
                write_kernels(tmp, model.config, archs, dtype={"float32": "fp32", "float16": "fp16"}[manifest.dtype])
            manifest.kernels = f"{KERNELS_DIR}/{INDEX}"
        (tmp / "manifest.json").write_text(manifest.to_json())
        if tok_path is not None:
            shutil.copy2(tok_path, tmp / tok_name)
    return out
