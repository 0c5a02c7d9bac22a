"""The deployed side of samba-edge: numpy + a backend + a tokenizer. Never imports torch at import time."""
from samba_edge.runtime.errors import SambaEdgeError
from samba_edge.runtime.sampling import SamplingParams
from samba_edge.runtime.session import Model, Stream, open_model

__all__ = ["Model", "SamplingParams", "SambaEdgeError", "Stream", "open_model"]
