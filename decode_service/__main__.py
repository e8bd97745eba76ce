"""`python -m decode_service --model DIR --port P --kv-transport tcp|nccl ...` (also `tandem decode`)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from engine.args import add_engine_arguments

    add_engine_arguments(p)
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on, gRPC and KV (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=50071, help="gRPC port (default 50071; 0 = any free port)")
    g.add_argument("--kv-transport", default="tcp", choices=["tcp", "nccl"],
                   help="how KV blocks arrive from prefill: tcp (CPU, cross-host) or nccl (GPU)")
    g.add_argument("--kv-port", type=int, default=0, help="port of the KV receiver (default: any free port)")
    g.add_argument("--local-prefill-threshold", type=int, default=32,
                   help="prefill here, with no transfer, when at most this many prompt tokens are not "
                        "already cached (default 32)")
    g.add_argument("--on-transfer-failure", default="recompute", choices=["recompute", "fail"],
                   help="when prefill or the KV transfer fails: recompute the prompt here (default) or "
                        "end the request with UNAVAILABLE")
    g.add_argument("--early-prefill-tokens", type=int, default=1024, metavar="N",
                   help="for prompts of at least N tokens, send the Prefill RPC before reserving the KV blocks "
                        "(they follow in SetDestination), so the reservation (1-2 ms at 8k tokens) overlaps "
                        "prefill's compute; shorter prompts, whose prefill may end first, reserve first "
                        "(default 1024; 0: always reserve first)")
    g.add_argument("--prefill-timeout", type=float, default=120.0,
                   help="seconds a Prefill call (compute + transfer) may take before it counts as failed")
    t = p.add_argument_group("testing (decode_service/faults.py; never in a deployment)")
    t.add_argument("--test-kv-delay", type=float, default=0.0, metavar="SECONDS",
                   help="see each KV transfer's end no sooner than this long after it was set up")
    t.add_argument("--test-kv-fail", action="store_true",
                   help="see each KV transfer FAILED (after --test-kv-delay) instead of DONE")
    t.add_argument("--test-destination-delay", type=float, default=0.0, metavar="SECONDS",
                   help="with --early-prefill-tokens, wait this long after reserving before SetDestination, so "
                        "prefill computes layers before their blocks are known (deferred, their sources pinned)")
    import registry

    registry.add_arguments(p)


def run(args) -> int:
    import registry

    from decode_service.server import DecodeServicer
    from engine.args import engine_config
    from engine.llm import LLMEngine
    from engine.loop import EngineLoop
    from kv_transfer import CacheLayout, make_receiver
    from protos import decode_pb2_grpc
    from protos.convert import static_info
    from protos.grpc_server import make_server, serve_until_signal

    if args.test_destination_delay < 0:
        raise SystemExit(f"--test-destination-delay: must be >= 0, got {args.test_destination_delay}")
    if args.early_prefill_tokens < 0:
        raise SystemExit(f"--early-prefill-tokens: must be >= 0, got {args.early_prefill_tokens}")
    cfg = engine_config(args)
    engine = LLMEngine(cfg, ops=args.ops)
    layout = CacheLayout.from_caches(cfg.model.fingerprint, engine.runner.kv_caches)
    receiver = make_receiver(args.kv_transport, layout, engine.runner.kv_caches, host=args.host, port=args.kv_port,
                             advertise_host=args.advertise_host)
    if args.test_kv_delay or args.test_kv_fail:
        from decode_service.faults import LateReceiver

        receiver = LateReceiver(receiver, args.test_kv_delay, args.test_kv_fail)
    loop = EngineLoop(engine).start()
    info = static_info("decode", engine, layout, args.kv_transport, receiver.address)
    servicer = DecodeServicer(loop, receiver, info, local_prefill_threshold=args.local_prefill_threshold,
                              on_transfer_failure=args.on_transfer_failure, prefill_timeout=args.prefill_timeout,
                              early_prefill_tokens=args.early_prefill_tokens,
                              destination_delay=args.test_destination_delay)
    server, port, hs = make_server(args.host, args.port,
                                   lambda s: decode_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, s),
                                   "tandem.v1.DecodeService")
    print(f"decode_service listening on {args.host}:{port}, KV receiver at {receiver.address}", flush=True)
    registration = registry.Registration(args, "decode", port,
                                         lambda: {**loop.load(), "kv_transport": args.kv_transport})

    def stop():
        loop.stop()
        receiver.close()

    serve_until_signal(server, hs, stop, on_start=registration.start, on_drain=registration.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    from protos.grpc_server import service_main

    return service_main("decode_service", "tandem decode service (gRPC)", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
