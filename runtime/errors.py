"""Re-export: the exception lives on the ground floor (plugins/errors.py) so every floor can raise it."""
from samba_edge.plugins.errors import SambaEdgeError

__all__ = ["SambaEdgeError"]
