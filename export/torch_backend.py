"""The PyTorch model behind the runtime's backend interface (numpy in, numpy out)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from samba_edge.export.checkpoint import load_checkpoint
from samba_edge.export.onnx_export import build_manifest, weights_fingerprint


class TorchBackend:
    name = "torch"

    def __init__(self, checkpoint: str, config: Optional[str] = None, last_only: bool = False) -> None:
        self.checkpoint = load_checkpoint(checkpoint, config)
        self.model = self.checkpoint.model()
        self.last_only = last_only
        self.manifest = build_manifest(self.model.config, "torch", 0, self.model.config.block_size,
                                       "last" if last_only else "all",
                                       weights_fingerprint(self.checkpoint.state_dict), None, {})

    @torch.no_grad()
    def run(self, input_ids: np.ndarray, start_pos: np.ndarray, state: Sequence[np.ndarray]):
        out = self.model(torch.as_tensor(np.asarray(input_ids, np.int64)), torch.as_tensor(np.asarray(start_pos, np.int64)),
                         *[torch.as_tensor(s) for s in state], last_only=self.last_only)
        return out[0].numpy(), [s.numpy() for s in out[1:]]
