"""Context daemon client: buffers (weights, KV cache) that outlive engine restarts.

Torch-free at import; `spotserve.daemon.mapping` and `spotserve.daemon.store` need torch.
"""
from spotserve.daemon.client import DaemonClient
from spotserve.daemon.launch import DaemonConfig, DaemonProcess, daemon_binary
from spotserve.daemon.protocol import PROTOCOL_VERSION, BufferInfo, DaemonError

__all__ = ["PROTOCOL_VERSION", "BufferInfo", "DaemonClient", "DaemonConfig", "DaemonError", "DaemonProcess",
           "daemon_binary"]
