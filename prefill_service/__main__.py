"""`python -m prefill_service --model DIR --port P --kv-transport tcp|nccl ...` (also `tandem prefill`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from engine.args import add_engine_arguments

    add_engine_arguments(p)
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=50061, help="gRPC port (default 50061; 0 = any free port)")
    g.add_argument("--kv-transport", default="tcp", choices=["tcp", "nccl"],
                   help="how KV blocks reach decode: tcp (CPU, cross-host) or nccl (GPU)")
    g.add_argument("--transfer-timeout", type=float, default=60.0,
                   help="seconds to wait for decode to acknowledge a request's KV (default 60)")
    g.add_argument("--kv-host-staging-mb", type=int, default=512, metavar="MIB",
                   help="tcp on a GPU: pinned host memory reserved at start-up for KV on its way to decode, so "
                        "the engine never pins memory mid-step (~0.5 ms a MiB); parts beyond it pin their own. "
                        "Rounded up to a power of two, as torch pins (default 512; 0: always pin per part)")
    import registry

    registry.add_arguments(p)


def run(args) -> int:
    import registry

    from engine.args import engine_config
    from engine.llm import LLMEngine
    from engine.loop import EngineLoop
    from kv_transfer import CacheLayout, make_sender
    from prefill_service.push import KVPusher
    from prefill_service.server import PrefillServicer
    from protos import prefill_pb2_grpc
    from protos.convert import static_info
    from protos.grpc_server import make_server, serve_until_signal

    if args.kv_host_staging_mb < 0:
        raise SystemExit(f"--kv-host-staging-mb: must be >= 0, got {args.kv_host_staging_mb}")
    cfg = engine_config(args)
    # Prefill computes prompts and samples only their first token: no decode steps to
    # replay, so no CUDA graphs (they would only hold memory).
    cfg = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, cuda_graphs=False))
    engine = LLMEngine(cfg, ops=args.ops)
    runner = engine.runner
    layout = CacheLayout.from_caches(cfg.model.fingerprint, runner.kv_caches)
    sender = make_sender(args.kv_transport, layout, runner.kv_caches, host_staging_bytes=args.kv_host_staging_mb << 20)
    pusher = KVPusher(sender, runner.layer_group, cfg.cache.block_size, cfg.model.attention_chunk_size, kv=engine.kv)
    loop = EngineLoop(engine, hook=pusher).start()
    info = static_info("prefill", engine, layout, args.kv_transport)
    servicer = PrefillServicer(loop, sender, pusher, info, args.transfer_timeout)
    server, port, hs = make_server(args.host, args.port,
                                   lambda s: prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, s),
                                   "tandem.v1.PrefillService")
    print(f"prefill_service listening on {args.host}:{port}", flush=True)
    registration = registry.Registration(args, "prefill", port,
                                         lambda: {**loop.load(), "kv_transport": args.kv_transport})

    def stop():
        loop.stop()
        sender.close()
        servicer.close()

    serve_until_signal(server, hs, stop, on_start=registration.start, on_drain=registration.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    from protos.grpc_server import service_main

    return service_main("prefill_service", "tandem prefill service (gRPC)", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
