"""Which standard-ONNX formulation of the selective scan the portable flavour uses, by measurement.

Candidates, both fp32 and exact (every exponent <= 0, so nothing overflows):
  scan:   ONNX `Scan` over time (the shipped body, export/onnx_ops.py): O(T) work, O(T*E*N) memory
  closed: closed form per chunk: cumsum of log-decays, a masked (T x T) decay matrix: O(T^2) work/memory
Each is run alone on ONNX Runtime (CPU) against the numpy reference; the report is a ratio per shape
measured in one run. Usage: python bench/portable_scan.py [--threads 2] [--repeat 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
from onnx import TensorProto, helper

from samba_edge.plugins.onnx_bodies import SIGNATURES, const as _const, scan_function as _scan_function
from samba_edge.plugins.reference import selective_scan_np


def closed_form_function(opset: int) -> onnx.FunctionProto:
    n = helper.make_node
    f32 = TensorProto.FLOAT
    nodes = [
        _const("ax0", [0]), _const("ax1", [1]), _const("ax2", [2]), _const("ax3", [3]),
        n("Unsqueeze", ["delta_bias", "ax1"], ["bias2"]), n("Add", ["delta", "bias2"], ["dpre"]),
        n("Softplus", ["dpre"], ["dsp"]),
        n("Transpose", ["dsp"], ["dT"], perm=[2, 0, 1]), n("Transpose", ["u"], ["uT"], perm=[2, 0, 1]),
        n("Unsqueeze", ["dT", "ax3"], ["dT4"]), n("Mul", ["dT4", "A"], ["logdecay"]),        # (T,b,E,N) <= 0
        n("CumSum", ["logdecay", "ax0"], ["Lc"]),
        n("Unsqueeze", ["Lc", "ax1"], ["Lt"]), n("Unsqueeze", ["Lc", "ax0"], ["Lj"]), n("Sub", ["Lt", "Lj"], ["diff"]),
        n("Shape", ["u"], ["T1"], start=2, end=3),
        n("ConstantOfShape", ["T1"], ["onesT"], value=helper.make_tensor("one", f32, [1], [1.0])),
        n("Unsqueeze", ["onesT", "ax1"], ["col"]), n("Unsqueeze", ["onesT", "ax0"], ["row"]),
        n("Mul", ["col", "row"], ["sq"]), n("Trilu", ["sq"], ["tri"], upper=0),
        n("Cast", ["tri"], ["trib"], to=TensorProto.BOOL),
        n("Unsqueeze", ["trib", "ax2"], ["m3"]), n("Unsqueeze", ["m3", "ax3"], ["m4"]), n("Unsqueeze", ["m4", "ax3"], ["m5"]),
        n("Constant", [], ["ninf"], value=helper.make_tensor("ninf", f32, [], [float("-inf")])),
        n("Where", ["m5", "diff", "ninf"], ["dm"]), n("Exp", ["dm"], ["Wt"]),                # (T,T,b,E,N)
        n("Mul", ["dT", "uT"], ["du"]), n("Unsqueeze", ["du", "ax3"], ["du4"]),
        n("Transpose", ["B"], ["BT"], perm=[2, 0, 1]), n("Unsqueeze", ["BT", "ax2"], ["BT4"]),
        n("Mul", ["du4", "BT4"], ["dBu"]), n("Unsqueeze", ["dBu", "ax0"], ["dBu5"]),
        n("Mul", ["Wt", "dBu5"], ["terms"]), n("ReduceSum", ["terms", "ax1"], ["inner"], keepdims=0),
        n("Exp", ["Lc"], ["decay0"]), n("Unsqueeze", ["ssm_state", "ax0"], ["s0"]), n("Mul", ["decay0", "s0"], ["carry"]),
        n("Add", ["inner", "carry"], ["hs"]),                                                # (T,b,E,N)
        n("Transpose", ["C"], ["CT"], perm=[2, 0, 1]), n("Unsqueeze", ["CT", "ax2"], ["CT4"]),
        n("Mul", ["hs", "CT4"], ["hc"]), n("ReduceSum", ["hc", "ax3"], ["ys"], keepdims=0),
        n("Shape", ["hs"], ["hshape"]), n("Gather", ["hs", "last"], ["ssm_state_out"], axis=0),
        n("Sub", ["T1", "one_i"], ["lastv"]), n("Squeeze", ["lastv"], ["last"]),
        n("Constant", [], ["one_i"], value=helper.make_tensor("one_i", TensorProto.INT64, [1], [1])),
        n("Transpose", ["ys"], ["y0"], perm=[1, 2, 0]),
        n("Unsqueeze", ["D", "ax1"], ["D2"]), n("Mul", ["D2", "u"], ["Du"]), n("Add", ["y0", "Du"], ["y1"]),
        n("Sigmoid", ["z"], ["zs"]), n("Mul", ["z", "zs"], ["zsilu"]), n("Mul", ["y1", "zsilu"], ["y"]),
    ]
    nodes = _topo(nodes)
    ins = SIGNATURES["SelectiveScan"][0]
    return helper.make_function("samba", "SelectiveScan", ins, ["y", "ssm_state_out"], nodes,
                                [helper.make_opsetid("", opset)])


def _topo(nodes):
    done, out, pending = {""}, [], list(nodes)
    ins = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "ssm_state"}
    done |= ins
    while pending:
        for nd in pending:
            if all(i in done for i in nd.input):
                out.append(nd)
                done |= set(nd.output)
                pending.remove(nd)
                break
    return out


def single_op_model(fn: onnx.FunctionProto, opset: int = 18) -> bytes:
    ins = SIGNATURES["SelectiveScan"][0]
    node = helper.make_node("SelectiveScan", ins, ["y", "ssm_state_out"], domain="samba")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in ins],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "ssm_state_out")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("samba", 1)],
                          functions=[fn])
    return onnx.inliner.inline_local_functions(m).SerializeToString()


def problem(b, E, N, T, seed=0):
    r = np.random.default_rng(seed)
    f = np.float32
    return dict(u=r.standard_normal((b, E, T)).astype(f), delta=r.standard_normal((b, E, T)).astype(f),
                A=-np.exp(r.standard_normal((E, N))).astype(f), B=r.standard_normal((b, N, T)).astype(f),
                C=r.standard_normal((b, N, T)).astype(f), D=r.standard_normal(E).astype(f),
                z=r.standard_normal((b, E, T)).astype(f), delta_bias=r.standard_normal(E).astype(f) - 3,
                ssm_state=r.standard_normal((b, E, N)).astype(f))


def timed(sess, feed, repeat):
    sess.run(None, feed)
    t = time.perf_counter()
    for _ in range(repeat):
        out = sess.run(None, feed)
    return (time.perf_counter() - t) / repeat, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-bytes", type=float, default=3e9, help="skip closed form above this T*T*E*N*4")
    a = ap.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    sessions = {k: ort.InferenceSession(single_op_model(fn), so, providers=["CPUExecutionProvider"])
                for k, fn in (("scan", _scan_function(18)), ("closed", closed_form_function(18)))}
    print(f"{'shape (b,E,N,T)':<22}{'scan ms':>10}{'closed ms':>11}{'closed/scan':>13}{'scan err':>10}{'closed err':>11}")
    for b, E, N, T in [(1, 512, 16, 1), (1, 512, 16, 16), (1, 512, 16, 64), (1, 512, 16, 256),
                       (1, 3072, 16, 1), (1, 3072, 16, 16), (1, 3072, 16, 64), (1, 3072, 16, 256)]:
        feed = problem(b, E, N, T)
        ref = selective_scan_np(**feed)
        ts, out = timed(sessions["scan"], feed, a.repeat)
        err_s = max(np.abs(o - r).max() for o, r in zip(out, ref))
        if T * T * E * N * 4 * b <= a.max_bytes:
            tc, outc = timed(sessions["closed"], feed, a.repeat)
            err_c = max(np.abs(o - r).max() for o, r in zip(outc, ref))
            extra = f"{tc * 1e3:>11.2f}{tc / ts:>13.2f}{err_s:>10.1e}{err_c:>11.1e}"
        else:
            extra = f"{'(T^2 memory > ' + format(a.max_bytes / 1e9, '.0f') + ' GB)':>34}{err_s:>10.1e}"
        print(f"{str((b, E, N, T)):<22}{ts * 1e3:>10.2f}{extra}")


if __name__ == "__main__":
    main()
