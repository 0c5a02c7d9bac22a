"""The PyTorch model behind the runtime's backend interface (numpy in, numpy out)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from samba_edge.export.onnx_export import build_manifest
from samba_edge.runtime.backends import HostState


class TorchBackend(HostState):
    name = "torch"

    def __init__(self, model, directory: Optional[Path] = None, fingerprint: str = "", last_only: bool = False) -> None:
        self.model, self.directory, self.last_only = model.eval(), directory, last_only
        cfg = model.config
        self.manifest = build_manifest(cfg, "torch", 0, cfg.block_size, "last" if last_only else "all",
                                       fingerprint, None, {})

    @classmethod
    def open(cls, checkpoint: str, config: Optional[str] = None, last_only: bool = False) -> "TorchBackend":
        from samba_edge.export.checkpoint import load_checkpoint
        from samba_edge.export.onnx_export import weights_fingerprint

        ckpt = load_checkpoint(checkpoint, config)
        return cls(ckpt.model(), ckpt.directory, weights_fingerprint(ckpt.state_dict), last_only)

    @torch.no_grad()
    def run(self, input_ids: np.ndarray, start_pos: np.ndarray, state: Sequence[np.ndarray]):
        out = self.model(torch.as_tensor(np.asarray(input_ids, np.int64)),
                         torch.as_tensor(np.asarray(start_pos, np.int64)),
                         *[torch.as_tensor(s) for s in state], last_only=self.last_only)
        return out[0].numpy(), [s.numpy() for s in out[1:]]
