"""Export time and peak memory for a full-size shape (default Samba_421M, random weights), both flavours.

    python bench/export_scale.py [--config Samba_421M] [--flavors plugin,portable] [--workdir DIR]

Each export runs in its own process (so its peak RSS is its own); the checkpoint is written once
in the canonical format first, exactly as a user's would be.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from samba_edge.export.onnx_export import export_onnx
t = time.perf_counter()
export_onnx(sys.argv[1], sys.argv[2], flavor=sys.argv[3], force=True)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def make_checkpoint(config: str, out: Path) -> Path:
    import torch

    from samba_edge.export.checkpoint import save_canonical
    from samba_edge.export.config import get_config
    from samba_edge.export.model import Samba, init_official

    torch.manual_seed(0)
    cfg = get_config(config)
    model = init_official(Samba(cfg), seed=0)
    return save_canonical(out, cfg, model.state_dict(), force=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="Samba_421M")
    ap.add_argument("--flavors", default="plugin,portable")
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="samba-scale-"))
    t = time.perf_counter()
    ck = make_checkpoint(a.config, work / "checkpoint")
    print(f"checkpoint {a.config} written in {time.perf_counter() - t:.1f}s "
          f"({sum(f.stat().st_size for f in ck.iterdir()) / 2**30:.2f} GiB)", flush=True)
    results = {}
    for flavor in a.flavors.split(","):
        r = subprocess.run([sys.executable, "-c", CHILD, str(ck), str(work / f"export-{flavor}"), flavor],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            sys.exit(f"{flavor} export failed")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        out = work / f"export-{flavor}"
        res["artifact_gib"] = sum(f.stat().st_size for f in out.iterdir()) / 2**30
        results[flavor] = res
        print(f"{flavor:>9}: {res['seconds']:.1f}s, peak RSS {res['peak_rss_gib']:.2f} GiB, "
              f"artifact {res['artifact_gib']:.2f} GiB", flush=True)
    print(json.dumps({"config": a.config, **results}))


if __name__ == "__main__":
    main()
