"""Moving KV blocks between processes: prefill (sender) pushes, decode (receiver) writes.

    from kv_transfer import make_receiver, make_sender, CacheLayout, TransferStatus
    layout = CacheLayout.from_caches("tiny-llama4", kv_caches)
    rx = make_receiver("tcp", layout, kv_caches)          # decode side
    tx = make_sender("tcp", layout, kv_caches)            # prefill side

The interface and the lifecycle live in base.py; the TCP backend (and the control plane
every backend shares) in receiver.py and sender.py, registered as "tcp" by tcp.py, with
its data plane in data_plane.py; the NCCL data plane in nccl.py, its pair groups in
nccl_groups.py.
"""

from kv_transfer.base import (BACKENDS, CacheLayout, KVReceiver, KVSender, LayoutMismatch, TransferError,
                              TransferStatus, make_receiver, make_sender)
from kv_transfer.tcp import TcpReceiver, TcpSender
from kv_transfer.nccl import NcclReceiver, NcclSender

__all__ = ["BACKENDS", "CacheLayout", "KVReceiver", "KVSender", "LayoutMismatch", "NcclReceiver",
           "NcclSender", "TcpReceiver", "TcpSender", "TransferError", "TransferStatus",
           "make_receiver", "make_sender"]
