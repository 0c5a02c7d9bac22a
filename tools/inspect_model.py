"""`samba-edge inspect`: what a checkpoint or a config is, without allocating its weights."""
from __future__ import annotations

from typing import Optional

from samba_edge.runtime.errors import SambaEdgeError


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def inspect_model(checkpoint: Optional[str] = None, config: Optional[str] = None, batch: int = 1) -> dict:
    """Config, layer map, parameter count and state bytes. With only --config, torch is never imported."""
    from samba_edge.export.config import get_config

    if checkpoint is None and config is None:
        raise SambaEdgeError("give a CHECKPOINT or --config NAME|FILE.json")
    if batch < 1:
        raise SambaEdgeError(f"--batch must be >= 1, got {batch}")
    info: dict = {}
    if checkpoint is not None:
        from samba_edge.export.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, config)
        cfg = ckpt.config
        tensors = {k: v for k, v in ckpt.state_dict.items() if k != "lm_head.weight" or not cfg.tied}
        info["checkpoint"] = checkpoint
        info["checkpoint_parameters"] = sum(v.numel() for v in tensors.values())
        info["checkpoint_dtypes"] = sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()})
    else:
        cfg = get_config(config)
    layers = []
    for i, kind in enumerate(cfg.layer_kinds()):
        state = [(n, list(s)) for n, s in cfg.state_shapes(batch) if n.endswith(f".{i}")]
        layers.append({"block": i, "mixer": kind, "mlp": "swiglu", "state": dict(state)})
    info.update({
        "config": cfg.to_dict(),
        "parameters": cfg.param_count(),
        "layers": layers,
        "state_bytes_per_stream": cfg.state_bytes(1),
        "state_bytes": cfg.state_bytes(batch),
        "batch": batch,
    })
    return info


def render_text(info: dict) -> str:
    c = info["config"]
    lines = [f"model {c['name']}: {c['n_layer']} blocks, d_model {c['n_embd']}, vocab {c['vocab_size']} "
             f"(padded {c['padded_vocab_size']}), window {c['local_window']}, "
             f"heads {c['n_head']} / kv groups {c['n_query_groups']} x {c['head_size']}, "
             f"mlp {c['intermediate_size']}, {'NoPE' if c['nope'] else 'RoPE base ' + str(c['rope_base'])}",
             f"parameters: {info['parameters']:,} "
             f"({'head tied to the embedding' if c.get('mamba_init', True) else 'untied head: its own weight'})"]
    if "checkpoint" in info:
        lines.append(f"checkpoint {info['checkpoint']}: {info['checkpoint_parameters']:,} parameters, "
                     f"dtypes {', '.join(info['checkpoint_dtypes'])}")
    lines.append(f"recurrent state: {_mib(info['state_bytes_per_stream'])} per stream "
                 f"({_mib(info['state_bytes'])} for batch {info['batch']}), fp32, constant in context length")
    lines.append("layers:")
    for layer in info["layers"]:
        st = ", ".join(f"{n} {tuple(s)}" for n, s in layer["state"].items())
        lines.append(f"  {layer['block']:>3}  {layer['mixer']:<9} + {layer['mlp']}   state: {st}")
    return "\n".join(lines)
