"""TCP backend: control and data over one socket per (sender, receiver) pair.

Its classes live in receiver.py (decode side, TcpReceiver) and sender.py (prefill side,
TcpSender), each with its lifecycle in the module docstring. They also carry the control
plane that every backend shares (handshake, headers, acks, failure handling); their data
side, the TCP data plane as the default hooks, is in data_plane.py (ReceiverDataPlane,
SenderDataPlane). A backend with another data plane (nccl.py) subclasses them and
overrides only the data-plane hooks at the end of each of those classes. Framing and the
message list: wire.py.

On CUDA caches the TCP data plane moves bytes through pinned host memory on both sides.
"""

from kv_transfer.base import register_backend
from kv_transfer.receiver import TcpReceiver
from kv_transfer.sender import TcpSender

__all__ = ["TcpReceiver", "TcpSender"]

register_backend("tcp")((TcpSender, TcpReceiver))
