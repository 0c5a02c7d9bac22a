"""`samba-edge calibrate`: an fp32 artifact + real text -> an INT8 explicit-quantisation (Q/DQ) artifact.

    W8A8 on the GEMMs only: Mamba in/x/dt/out projections, attention qkv and output, the SwiGLU
    MLP (the output head optionally). Symmetric int8, zero point 0, weights per output channel,
    activations per tensor. Everything else stays fp32: conv1d, the scan and its inputs' maths,
    norms, RoPE, softmax and every state tensor.

Why onnxruntime.quantization: it is maintained, runs on CPU, writes exactly the zero-point-0
Q/DQ pairs TensorRT's explicit-quantisation path consumes, and it calibrates with the methods we
offer (max, entropy, percentile). ModelOpt (the other candidate) pins onnx/onnxruntime versions
we cannot share and wants TensorRT to calibrate graphs with custom ops (../shared/notes/toolchain.md).

Calibration data is one real token stream: consecutive chunks with the fp32 model's recurrent state
carried between them (run by the fp32 artifact itself), so the scan-facing projections see the
activations of a long stream, not of cold starts. The one thing ORT's calibrator does not know is our
custom ops: its sessions are built by `_PluginCalibrater.create_inference_session`, which registers
the numpy op references (plugins/ort_ops.py). Ranges go through ORT's calibration cache, so the
quantiser itself is stock `quantize_static`.
"""
from __future__ import annotations

import contextlib
import fnmatch
import gc
import hashlib
import io
import logging
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.manifest import Manifest

METHODS = ("max", "entropy", "percentile")
DEFAULT_CHUNK = 128
CALIB_GROUP = 4               # chunks per ORT collect_data call: what calibration holds in memory at once,
CALIB_HELD_BYTES = 256 * 2**20  # fewer where their outputs (state, logits) would pass this
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _ort_quant():
    try:
        import onnxruntime.quantization as q
    except ImportError:
        raise SambaEdgeError("calibrate needs onnxruntime: pip install 'samba-edge[ort]'") from None
    return q


# ---- which GEMMs ----------------------------------------------------------------------------
def gemm_labels(proto, model: dict) -> dict[str, str]:
    """MatMul node name -> a readable label ("h.0.attn.in_proj", "h.1.attn.qkv", "h.2.mlp.w3", ...,
    "lm_head") for every weight GEMM of the graph; matmuls between activations (attention inside the portable body) are
    not weight GEMMs and are left out. dt_proj is found by its weight shape (R, E): it is computed by
    F.linear in fp32, so it has no module scope of its own."""
    consts = {i.name: list(i.dims) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    from samba_edge.export.config import SambaConfig

    cfg = SambaConfig.from_dict(model)
    R, E = cfg.dt_rank, cfg.d_inner
    labels = {}
    for n in proto.graph.node:
        if n.op_type != "MatMul" or n.domain not in ("", "ai.onnx"):
            continue
        w = n.input[1]
        src = producers.get(w)
        tied_head = src is not None and src.op_type == "Transpose" and src.input[0] in consts
        if w not in consts and not tied_head:
            continue
        scope = {p.key: p.value for p in n.metadata_props}.get(SCOPE_KEY, "")
        paths = [s.strip(" '[]") for s in scope.split(",") if s.strip(" '[]").startswith("model.transformer.h.")]
        # the head: Transpose(wte) when tied; when untied (mamba_init false) its own (d, V) weight, folded
        # to an initializer outside every block
        head = tied_head or (not paths and consts[w] == [cfg.n_embd, cfg.padded_vocab_size])
        if head:
            label = "lm_head"
        elif paths:
            label = paths[-1].replace("model.transformer.", "").replace(".mlp.swiglu", ".mlp").replace(".attn.attn", ".attn.qkv")
            if consts[w] == [R, E] and label.endswith(".attn"):
                label += ".dt_proj"
        else:
            label = n.name
        labels[n.name] = label
    return labels


def _untie_head(proto, node_name: str, weights_dir: Optional[Path] = None) -> None:
    """Give a tied head's MatMul its own (transposed) weight initializer so it can be quantised per channel;
    the embedding Gather keeps the fp32 table. An untied head has its own already."""
    from onnx import numpy_helper

    consts = {i.name: i for i in proto.graph.initializer}
    node = next(n for n in proto.graph.node if n.name == node_name)
    if node.input[1] in consts:
        return
    src = next(n for n in proto.graph.node if node.input[1] in n.output)
    w = numpy_helper.to_array(consts[src.input[0]], base_dir=str(weights_dir or "")).T.copy()
    proto.graph.initializer.append(numpy_helper.from_array(w, "lm_head.weight.T"))
    node.input[1] = "lm_head.weight.T"
    if not any(src.output[0] in n.input for n in proto.graph.node):      # the Transpose fed only the head:
        proto.graph.node.remove(src)                                       # a dead read of the fp32 table


def _own_activation_pairs(proto) -> int:
    """Give every quantised GEMM its own activation Q/DQ pair (ORT's quantiser shares one between the GEMMs
    that read the same tensor: SwiGLU w1/w2, q/k/v). Same values, same scales, still explicit Q/DQ (TensorRT
    reads it alike); but a DequantizeLinear with one consumer is what ONNX Runtime's CPU QDQ fusion needs to
    turn DQ -> MatMul into an integer GEMM (MatMulIntegerToFloat). Without it those GEMMs dequantise their
    weights to fp32 at every step. Returns the number of pairs added. (The runtime disables ORT's common
    subexpression elimination for int8 graphs, which would merge the pairs back.)"""
    from onnx import helper

    producer = {o: n for n in proto.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in proto.graph.node:
        for i, x in enumerate(n.input):
            users.setdefault(x, []).append((n, i))
    nodes, added = [], 0
    for n in proto.graph.node:
        nodes.append(n)
        q = producer.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(users.get(n.output[0], [])) < 2:
            continue
        for k, (user, i) in enumerate(users[n.output[0]][1:], 1):
            qo, do = f"{q.output[0]}/own{k}", f"{n.output[0]}/own{k}"
            nodes.append(helper.make_node("QuantizeLinear", list(q.input), [qo], name=f"{q.name}/own{k}"))
            nodes[-1].attribute.extend(q.attribute)
            nodes.append(helper.make_node("DequantizeLinear", [qo, *n.input[1:]], [do], name=f"{n.name}/own{k}"))
            nodes[-1].attribute.extend(n.attribute)
            user.input[i] = do
            added += 1
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return added


# ---- calibration data -----------------------------------------------------------------------
def read_texts(paths: Sequence[str]) -> list[str]:
    from samba_edge.runtime.userio import read_text_file

    return [read_text_file(p, "calibration text") for p in paths]


class StreamReader:
    """ORT CalibrationDataReader over one token stream: `samples` consecutive chunks of `chunk` tokens,
    each with the state the fp32 graph carries into it. The state comes from the calibration session's
    own run of the previous chunk (`take_outputs`, called by the session tap below), so every chunk runs
    once and no second session (a second copy of the weights and of ORT's arena) is needed.

    ORT's histogram calibraters hold every output of everything one `collect_data` call reads (2.1 GB for
    64 chunks of the 19 MB tiny model) and merge histograms across calls, so the reader hands out `group`
    chunks per call (`groups()`): memory is one group's outputs."""

    def __init__(self, manifest: Manifest, ids: np.ndarray, samples: int, chunk: int, progress=None,
                 group: int = 1) -> None:
        self.manifest, self.ids, self.samples, self.chunk, self.progress = manifest, ids, samples, chunk, progress
        self.group = group
        self.names = [t.name for t in manifest.inputs]
        self.rewind()

    def rewind(self) -> None:
        self.i = 0
        self.stop = self.samples
        self.state = self.manifest.empty_state(1)

    def groups(self):
        """Yield once per group; between yields `get_next` serves that group's chunks, then None."""
        while self.i < self.samples:
            self.stop = min(self.i + self.group, self.samples)
            yield self
        self.stop = self.samples

    def get_next(self) -> Optional[dict]:
        if self.i >= self.stop:
            return None
        p = self.i * self.chunk
        piece = self.ids[None, p:p + self.chunk]
        feed = dict(zip(self.names, [piece, np.array([p], dtype=np.int64), *self.state]))
        self.i += 1
        if self.progress is not None:
            self.progress.update(1)
        return feed

    def __len__(self) -> int:
        return self.samples

    def take_outputs(self, outputs: dict) -> None:
        """The outputs of the run of the chunk just served: its state is the next chunk's."""
        self.state = [outputs[s.output] for s in self.manifest.state]


class _StateTap:
    """The calibration session, with every run's outputs shown to the reader (for the state)."""

    def __init__(self, session, reader: StreamReader) -> None:
        self.session, self.reader = session, reader
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, output_names, feed, *a, **k):
        out = self.session.run(output_names, feed, *a, **k)
        self.reader.take_outputs(dict(zip(output_names or self.output_names, out)))
        return out

    def __getattr__(self, name):
        return getattr(self.session, name)



def _calibrater(q, method: str, percentile: float, activations: set[str]):
    """ORT's calibrater for `method`, with sessions that know the samba.* ops, observing only
    `activations` (the quantised GEMMs' activation inputs: ORT would also record every MatMul output,
    which no Q/DQ pair here uses)."""
    from samba_edge.plugins.ort_ops import plugin_session

    base = {"max": q.calibrate.MinMaxCalibrater, "entropy": q.calibrate.EntropyCalibrater,
            "percentile": q.calibrate.PercentileCalibrater}[method]

    class _PluginCalibrater(base):
        def select_tensors_to_calibrate(self, model):
            tensors, value_infos = super().select_tensors_to_calibrate(model)
            return tensors & activations, value_infos

        def create_inference_session(self):
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.add_session_config_entry("session.disable_prepacking", "1")   # no second copy of the weights
            so.enable_cpu_mem_arena = False          # an arena keeps the largest chunk's activations reserved
            so.log_severity_level = 3
            self.infer_session = plugin_session(self.augmented_model_path, so, self.execution_providers)

    kw = {"symmetric": True}
    if method == "percentile":
        kw["percentile"] = percentile
    if method == "entropy":         # ORT's default of 128 bins leaves KL one candidate (the full range)
        kw.update(num_bins=2048, num_quantized_bins=128)             # TensorRT's choice
    return _PluginCalibrater, kw


# ---- the command ----------------------------------------------------------------------------
def calibrate(export_dir: str | Path, out: str | Path, texts: Sequence[str] = (), token_ids: Optional[str] = None,
              samples: int = 64, chunk: Optional[int] = None, method: str = "percentile", percentile: float = 99.99,
              include_head: bool = True, exclude: Sequence[str] = (), force: bool = False,
              progress: bool = True) -> dict:
    """Public entry of `samba-edge calibrate`; returns the quantisation record written to the manifest.

    exclude: glob patterns over GEMM labels (e.g. "*.x_proj", "h.0.*") kept in fp32."""
    import inspect

    import onnx

    from samba_edge.export.onnx_export import is_large, save_onnx
    from samba_edge.runtime.atomic import atomic_dir, check_output, temp_dir
    from samba_edge.runtime.integrity import digests
    from samba_edge.runtime.progress import counter
    from samba_edge.runtime.userio import load_token_ids, token_ids as checked_ids

    q = _ort_quant()
    if "calibration_cache_path" not in inspect.signature(q.quantize_static).parameters:
        raise SambaEdgeError("calibrate needs onnxruntime >= 1.31 (quantize_static with calibration_cache_path): "
                             "pip install -U onnxruntime")
    if method not in METHODS:
        raise SambaEdgeError(f"unknown calibration method {method!r}; use one of: {', '.join(METHODS)}")
    if (not texts) == (token_ids is None):
        raise SambaEdgeError("give calibration data: --text FILE (repeatable) or --token-ids F.npy (not both)")
    if samples < 1 or (chunk is not None and chunk < 1):
        raise SambaEdgeError(f"--samples and --chunk must be >= 1 (got {samples}, {chunk})")
    if not 50.0 < percentile < 100.0:
        raise SambaEdgeError(f"--percentile must lie in (50, 100), got {percentile}")
    src = Path(export_dir)
    manifest = Manifest.load(src)
    if manifest.dtype != "float32":
        what = "already quantised" if manifest.dtype == "int8" else f"a {manifest.dtype} export"
        raise SambaEdgeError(f"{src} is {what}; calibrate an fp32 export (samba-edge export ... --dtype fp32)")
    chunk = chunk or min(DEFAULT_CHUNK, manifest.max_chunk)
    if chunk > manifest.max_chunk:
        raise SambaEdgeError(f"--chunk {chunk} exceeds the artifact's max chunk {manifest.max_chunk}")
    # the graph without its weights: at 421M they are 1.7 GB that the calibration session and the quantiser
    # read from disk themselves
    proto = onnx.load(str(src / manifest.onnx_file), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    if any(n.op_type in QDQ_OPS for n in proto.graph.node):
        raise SambaEdgeError(f"{src} already contains Q/DQ nodes (already quantised); calibrate the fp32 export")
    out = Path(out)
    check_output(out, force)

    if token_ids is not None:
        ids = load_token_ids(token_ids, manifest.vocab_size)
        data_desc = {"token_ids": Path(token_ids).name}
    else:
        from samba_edge.runtime.tokenizer import load_tokenizer

        tok = load_tokenizer(src)
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        bodies = read_texts(texts)
        ids = np.asarray([i for t in bodies for i in ([start] if start is not None else []) + tok.encode(t)],
                         dtype=np.int64)
        ids = checked_ids(ids, manifest.vocab_size, "calibration text")
        data_desc = {"texts": [Path(t).name for t in texts],
                     "sha256": hashlib.sha256("".join(bodies).encode()).hexdigest()}
    need = samples * chunk
    if ids.size < need:
        have = ids.size // chunk
        raise SambaEdgeError(f"calibration data has {ids.size} tokens, {need} needed for {samples} samples of "
                             f"{chunk}; give more text, or --samples {max(have, 1)} / a smaller --chunk")

    labels = gemm_labels(proto, manifest.model)
    chosen = {n: lab for n, lab in labels.items()
              if (include_head or lab != "lm_head") and not any(fnmatch.fnmatch(lab, pat) for pat in exclude)}
    if not chosen:
        raise SambaEdgeError("every GEMM is excluded; nothing to quantise (check --exclude)")
    if include_head:
        _untie_head(proto, next(n for n, lab in labels.items() if lab == "lm_head"), src)

    large = external or is_large(proto)
    bar = counter(samples, f"calibrating ({method})", unit="chunk") if progress else None
    with temp_dir(out, "calib") as tmp:              # beside the output, not in /tmp: GBs at 421M
        tmp = Path(tmp)
        model_in = tmp / "model_fp32.onnx"
        if external:                                 # the weights stay on disk: the graph's own data file
            shutil.copyfile(src / f"{manifest.onnx_file}.data", tmp / f"{manifest.onnx_file}.data")
            onnx.save_model(proto, str(model_in))
        else:
            onnx.save_model(proto, str(model_in), save_as_external_data=True, location="model_fp32.onnx.data")
        nodes = {n.name: n for n in proto.graph.node}
        activations = {nodes[n].input[0] for n in chosen}
        cls, kw = _calibrater(q, method, percentile, activations)
        calib = cls(model_in, ["MatMul"], str(tmp / "augmented.onnx"), use_external_data_format=True, **kw)
        calib.augment_graph()
        calib.create_inference_session()
        calib.model = None                           # ORT's in-memory copy of the weights (1.7 GB at 421M):
        gc.collect()                                 # the session has its own, nothing after augmenting reads it
        # ORT holds every output of a collect_data call (state and logits included) until it returns
        per_sample = manifest.state_bytes(1) + 4 * chunk * manifest.model["padded_vocab_size"]
        group = max(1, min(CALIB_GROUP, CALIB_HELD_BYTES // per_sample))
        reader = StreamReader(manifest, ids, samples, chunk, bar, group=group)
        calib.infer_session = _StateTap(calib.infer_session, reader)
        with contextlib.redirect_stdout(io.StringIO()):          # ORT prints its histogram steps
            for part in reader.groups():
                calib.collect_data(part)
            ranges = calib.compute_data()
        if bar is not None:
            bar.close()
        del calib, reader                            # before the quantiser loads the weights
        gc.collect()
        q.calibrate.save_tensors_data(ranges, tmp / "ranges.json")
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)           # ORT's "consider pre-processing" advice
        try:
            q.quantize_static(
                str(model_in), str(tmp / "model.onnx"), calibration_data_reader=None,
                calibration_cache_path=str(tmp / "ranges.json"), calibrate_method=_method_enum(q, method),
                quant_format=q.QuantFormat.QDQ, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                per_channel=True, op_types_to_quantize=["MatMul"], nodes_to_quantize=sorted(chosen),
                use_external_data_format=large,
                # GEMM inputs only: an int8 round trip on the outputs would quantise delta, B, C and the
                # residual updates too (and TensorRT's int8 GEMMs emit float anyway)
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "OpTypesToExcludeOutputQuantization": ["MatMul"]})
        finally:
            logging.getLogger().setLevel(level)
        qproto = onnx.load(str(tmp / "model.onnx"))
    if not any(n.op_type == "QuantizeLinear" for n in qproto.graph.node):
        raise SambaEdgeError("the quantiser inserted no Q/DQ pairs; is this a samba-edge export?")
    _own_activation_pairs(qproto)
    record = {"method": method, "percentile": percentile if method == "percentile" else None,
              "samples": samples, "chunk": chunk, "tokens": need, "data": data_desc,
              "scheme": "int8 symmetric, zero point 0; weights per output channel; activations per tensor",
              "quantized": sorted(chosen.values()), "kept_fp32": sorted(set(labels.values()) - set(chosen.values())),
              "library": f"onnxruntime.quantization {_version('onnxruntime')}", "source_artifact": str(src.resolve())}
    manifest.dtype = "int8"
    manifest.quantization = record
    onnx.helper.set_model_props(qproto, {**{p.key: p.value for p in qproto.metadata_props},
                                         "samba_edge.dtype": "int8"})
    with atomic_dir(out, force) as tmp_out:
        save_onnx(qproto, tmp_out / manifest.onnx_file)
        manifest.files = digests(tmp_out, manifest.onnx_file)
        for f in src.iterdir():                      # tokenizer, kernels, ... (not the graph or its data)
            if f.name in (manifest.onnx_file, f"{manifest.onnx_file}.data", "manifest.json"):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp_out / f.name)
        (tmp_out / "manifest.json").write_text(manifest.to_json())
    return record


def _method_enum(q, method: str):
    return {"max": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile}[method]


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)
