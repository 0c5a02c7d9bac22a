"""Accuracy of the shipped tiny model's fp16 and int8 artifacts against fp32, in one run.

    python bench/precision.py [--work DIR] [--max-tokens 200000] [--stability-tokens 20000]
                              [--json F] [--markdown docs/precision.md]

1. Artifacts (plugin flavour, the one TensorRT builds): fp32 and fp16 from `samba-edge export`, int8
   from `samba-edge calibrate` on training-split stdlib text (never the held-out files) with every
   calibration method and the remedies for SSM quantisation: percentile clipping (incl. of the scan
   input), and keeping the most sensitive projections in fp32.
2. Held-out accuracy: the checkpoint's held-out stdlib files (heldout_files.txt), each from an empty
   state as `samba-edge eval` scores them (up to --max-tokens): perplexity, bits per byte, top-1
   next-token agreement with fp32.
3. Long-stream stability: greedy generation of --stability-tokens tokens, token by token, by each of
   fp32/fp16/int8 (NaN/Inf check on every step's logits); then the fp32 greedy sequence is fed to the
   fp16 and int8 artifacts and their top-1 agreement with it (= with fp32) is reported by position bucket.

Timings are not the point here (bench.py measures speed). Needs the `export`+`ort` extras and this
interpreter's stdlib sources (the held-out list names them).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

CK = "builtin:samba-tiny-py"
BUCKETS = (0, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
# (row name, calibrate keyword arguments): the default first, then the alternatives and remedies
INT8_VARIANTS = [
    ("int8 (default: percentile 99.99)", {}),
    ("int8 max", {"method": "max"}),
    ("int8 entropy", {"method": "entropy"}),
    ("int8 percentile 99.999", {"percentile": 99.999}),
    ("int8 percentile 99.9", {"percentile": 99.9}),
    ("int8 max + scan input (x_proj, dt_proj) fp32", {"method": "max", "exclude": ["*.x_proj", "*.dt_proj"]}),
    ("int8 percentile + MLP down-proj (w3) fp32", {"exclude": ["*.mlp.w3"]}),
    ("int8 percentile + first block fp32", {"exclude": ["h.0.*"]}),
    ("int8 percentile + head fp32", {"include_head": False}),
]


def calibration_text(out: Path, chars: int = 200_000) -> Path:
    """Training-split stdlib files (seeded shuffle) up to `chars` characters."""
    from samba_edge.tools.train_tiny import is_heldout

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts
                   and not is_heldout(str(p.relative_to(root))))
    random.Random(0).shuffle(files)
    picked, n = [], 0
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        picked.append(t)
        n += len(t)
        if n >= chars:
            break
    out.write_text("\n".join(picked), encoding="utf-8")
    return out


def heldout_docs(tokenizer, max_tokens: int):
    """The checkpoint's held-out files, whole, in list order, up to max_tokens tokens."""
    from samba_edge.export.checkpoint import resolve
    from samba_edge.tools.compare_xz import heldout_texts
    from samba_edge.tools.evaluate import document_ids

    docs, n_bytes, total = [], 0, 0
    for text in heldout_texts(resolve(CK)):
        ids, nb = document_ids(tokenizer, [text])
        if not ids:
            continue
        full = ids[0]
        ids = full[:max_tokens - total]                      # the last file may be cut at the budget
        if len(ids) < 2:
            break
        docs.append(ids)
        n_bytes += nb if len(ids) == len(full) else len(tokenizer.decode(ids[1:].tolist()).encode("utf-8"))
        total += len(ids)
    return docs, n_bytes


def greedy(backend, prompt: list[int], n: int):
    """n greedy tokens through the runtime's own streaming path (one step each; no tokenizer, so no
    end-of-text stop); returns (tokens, number of steps with non-finite logits or state)."""
    from samba_edge.runtime import SamplingParams
    from samba_edge.runtime.session import Model

    s = Model(backend).new_stream()
    toks, bad = [], int(not np.isfinite(s.feed(prompt)).all())
    for t in s.generate_ids(SamplingParams(max_new_tokens=n)):
        toks.append(t)
        bad += int(not np.isfinite(s.last_logits).all())
    bad += int(not all(np.isfinite(x).all() for x in backend.state_to_host(s.state)))
    return toks, bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", help="directory for the artifacts (default: a temporary one)")
    ap.add_argument("--max-tokens", type=int, default=200_000, help="held-out tokens to score (whole files)")
    ap.add_argument("--stability-tokens", type=int, default=20_000)
    ap.add_argument("--samples", type=int, default=64, help="calibration chunks of 128 tokens")
    ap.add_argument("--variants", default="all", help="'all' or 'default' (the default int8 only)")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--markdown", help="write the tables here (e.g. docs/precision.md's generated part)")
    args = ap.parse_args(argv)

    from samba_edge.calibration.int8 import calibrate
    from samba_edge.export.onnx_export import export_onnx
    from samba_edge.runtime.backends import OrtBackend
    from samba_edge.runtime.tokenizer import load_tokenizer
    from samba_edge.tools.evaluate import score_ids, stream_scores

    work = Path(args.work or tempfile.mkdtemp(prefix="samba-edge-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    arts = {"fp32": export_onnx(CK, work / "fp32", force=True), "fp16": export_onnx(CK, work / "fp16", dtype="fp16", force=True)}
    text = calibration_text(work / "calibration.txt")
    variants = INT8_VARIANTS if args.variants == "all" else INT8_VARIANTS[:1]
    for i, (name, kw) in enumerate(variants):
        calibrate(arts["fp32"], work / f"int8_{i}", [str(text)], samples=args.samples, force=True, progress=False, **kw)
        arts[name] = work / f"int8_{i}"
    print(f"artifacts ready ({time.time() - t0:.0f} s)", file=sys.stderr)

    be = {k: OrtBackend(v) for k, v in arts.items()}
    tok = load_tokenizer(arts["fp32"])
    docs, n_bytes = heldout_docs(tok, args.max_tokens)
    rows, ref_top1 = [], None
    for name, b in be.items():
        res = score_ids(b, docs, 256, n_bytes)
        top1 = res.pop("top1")
        ref_top1 = top1 if ref_top1 is None else ref_top1
        res["top1_agreement"] = float(np.mean(top1 == ref_top1))
        rows.append({"artifact": name, **res})
        print(f"{name}: ppl {res['ppl']:.4f}  bpb {res['bits_per_byte']:.4f}  agree {res['top1_agreement']:.4f}",
              file=sys.stderr)
    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_rel_change"] = r["ppl"] / base - 1

    # long-stream stability (the default int8 only)
    n = args.stability_tokens
    prompt = tok.encode("import os\n\n\ndef main():\n")
    stab = {}
    gen = {}
    for name in ("fp32", "fp16", variants[0][0]):
        t1 = time.time()
        gen[name], bad = greedy(be[name], prompt, n)
        stab[name] = {"nonfinite_steps": bad, "seconds": round(time.time() - t1, 1)}
        print(f"greedy {name}: {n} tokens, non-finite steps {bad}", file=sys.stderr)
    seq = np.asarray(prompt + gen["fp32"], dtype=np.int64)
    ref = seq[len(prompt):]                     # fp32's greedy choices = fp32's top-1 at those positions
    edges = [b for b in BUCKETS if b < n] + [n]
    for name in ("fp16", variants[0][0]):
        top1 = stream_scores(be[name], seq, 256)[1][len(prompt) - 1:]
        agree = top1[:n] == ref
        stab[name]["first_free_running_divergence"] = next(
            (i for i, (a, b) in enumerate(zip(gen[name], gen["fp32"])) if a != b), None)
        stab[name]["agreement_by_position"] = {f"{lo}-{hi}": float(agree[lo:hi].mean())
                                               for lo, hi in zip(edges[:-1], edges[1:])}
    result = {"checkpoint": CK, "heldout_files": len(docs), "heldout_tokens": int(sum(len(d) - 1 for d in docs)),
              "calibration": {"text_chars": len(text.read_text()), "samples": args.samples, "chunk": 128},
              "accuracy": rows, "stability": {"tokens": n, "prompt": tok.decode(prompt), **stab},
              "seconds": round(time.time() - t0, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    table = render_markdown(result)
    if args.markdown:
        Path(args.markdown).write_text(table)
    print(table)
    ok = all(s.get("nonfinite_steps", 0) == 0 for s in stab.values())
    return 0 if ok else 1


def render_markdown(r: dict) -> str:
    out = [f"Held-out: {r['heldout_files']} files, {r['heldout_tokens']:,} scored tokens; calibration: "
           f"{r['calibration']['samples']} chunks x {r['calibration']['chunk']} tokens of training-split text.", "",
           "| artifact | perplexity | vs fp32 | bits/byte | top-1 agreement with fp32 |",
           "|---|---:|---:|---:|---:|"]
    for x in r["accuracy"]:
        out.append(f"| {x['artifact']} | {x['ppl']:.4f} | {100 * x['ppl_rel_change']:+.2f}% | "
                   f"{x['bits_per_byte']:.4f} | {100 * x['top1_agreement']:.2f}% |")
    s = r["stability"]
    names = [k for k in s if isinstance(s[k], dict) and "agreement_by_position" in s[k]]
    buckets = list(s[names[0]]["agreement_by_position"]) if names else []
    out += ["", f"Greedy generation of {s['tokens']:,} tokens (prompt {s['prompt']!r}), token by token:", "",
            "| artifact | non-finite steps | first divergence from fp32 (free-running) | "
            + " | ".join(f"agree {b}" for b in buckets) + " |",
            "|---|---:|---:|" + "---:|" * len(buckets)]
    for k in [k for k in s if isinstance(s[k], dict)]:
        v = s[k]
        agree = v.get("agreement_by_position", {})
        div = v.get("first_free_running_divergence", "-")
        out.append(f"| {k} | {v['nonfinite_steps']} | {'never' if div is None else div} | "
                   + " | ".join(f"{100 * agree[b]:.2f}%" if b in agree else "-" for b in buckets) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
