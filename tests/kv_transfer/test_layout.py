"""Handshake: layouts must match field for field, or the connection is refused."""

import dataclasses
import logging
import socket

import pytest
import torch

from kv_transfer import (CacheLayout, LayoutMismatch, TcpReceiver, TcpSender, TransferError, make_receiver,
                         make_sender)
from tests.kv_transfer.helpers import make_caches

BASE = CacheLayout(model="tiny-llama4", dtype="float32", num_layers=4, num_kv_heads=2, head_dim=8,
                   block_size=4, tp_rank=0, tp_size=2)


def caches_for(layout: CacheLayout) -> list[torch.Tensor]:
    return make_caches(getattr(torch, layout.dtype), seed=0, num_blocks=(8,) * layout.num_layers,
                       block_size=layout.block_size, kv_heads=layout.num_kv_heads, head_dim=layout.head_dim)


@pytest.mark.parametrize("change", [
    {"model": "other-model"}, {"dtype": "bfloat16"}, {"num_layers": 3}, {"num_kv_heads": 4},
    {"head_dim": 16}, {"block_size": 8}, {"tp_rank": 1}, {"tp_size": 4},
], ids=lambda c: next(iter(c)))
def test_mismatch_refused_at_connect(change, caplog):
    other = dataclasses.replace(BASE, **change)
    (field, value), = change.items()
    with TcpReceiver(BASE, caches_for(BASE)) as rx, TcpSender(other, caches_for(other)) as tx:
        with caplog.at_level(logging.WARNING, logger="kv_transfer.receiver"):
            with pytest.raises(LayoutMismatch) as err:
                tx.connect(rx.address)
        msg = str(err.value)
        assert field in msg and repr(value) in msg and repr(getattr(BASE, field)) in msg, msg
        assert rx.address in msg
        # the receiver refused (and logged) it too; nothing stays connected
        assert rx.stats()["connections_refused"] == 1
        assert any("refusing KV sender" in r.message and field in r.message for r in caplog.records)
        assert tx.stats()["connections"] == 0


def test_mismatch_message_names_every_field():
    other = dataclasses.replace(BASE, model="m2", head_dim=16)
    with pytest.raises(LayoutMismatch) as err:
        BASE.check_compatible(other)
    assert "model: 'tiny-llama4' here vs 'm2' at peer" in str(err.value)
    assert "head_dim: 8 here vs 16 at peer" in str(err.value)
    assert isinstance(err.value, ValueError)
    BASE.check_compatible(dataclasses.replace(BASE))


def test_layout_dict_round_trip_and_validation():
    assert CacheLayout.from_dict(BASE.to_dict()) == BASE
    with pytest.raises(ValueError, match="unknown fields"):
        CacheLayout.from_dict({**BASE.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="tp_rank"):
        dataclasses.replace(BASE, tp_rank=2)
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(BASE, dtype="float99")


def test_from_caches_and_cache_checks():
    caches = make_caches(torch.bfloat16, seed=0)
    layout = CacheLayout.from_caches("m", caches, tp_rank=1, tp_size=2)
    assert (layout.dtype, layout.num_layers, layout.block_size, layout.num_kv_heads, layout.head_dim) == \
        ("bfloat16", 4, 4, 2, 8)
    bad = caches[:3] + [torch.zeros(2, 8, 4, 3, 8, dtype=torch.bfloat16)]
    with pytest.raises(ValueError, match=r"kv_caches\[3\]"):
        CacheLayout.from_caches("m", bad)
    with pytest.raises(ValueError, match="3 layers"):
        TcpSender(layout, caches[:3])


def test_unreachable_peer_names_the_address():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there now
    with TcpSender(BASE, caches_for(BASE)) as tx:
        with pytest.raises(TransferError, match=address):
            tx.connect(address)


def test_registry():
    caches = caches_for(BASE)
    with make_receiver("tcp", BASE, caches) as rx, make_sender("tcp", BASE, caches) as tx:
        assert isinstance(rx, TcpReceiver) and isinstance(tx, TcpSender)
    with pytest.raises(ValueError, match="unknown 'carrier-pigeon'.*nccl.*tcp"):
        make_sender("carrier-pigeon", BASE, caches)
