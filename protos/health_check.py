"""`python -m protos.health_check HOST:PORT [--timeout S] [--service NAME]`: exit 0 when
the gRPC server at HOST:PORT answers the standard health check with SERVING, 1 otherwise
(unreachable, NOT_SERVING, or no answer within --timeout seconds).

It exists so container healthchecks (docker-compose.yml) need nothing but the image
itself: no grpc_health_probe binary. It imports only grpc, never torch, so a check costs
a fraction of a second of CPU even when it runs every few seconds.
"""

from __future__ import annotations

import argparse
import os
import sys

from protos.grpc_server import wait_healthy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m protos.health_check",
                                description="exit 0 if a gRPC server reports SERVING, 1 otherwise")
    p.add_argument("address", metavar="HOST:PORT", help="the gRPC server to ask")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to keep asking before giving up (default 5); a single attempt "
                        "may add up to 2 s to this against a host that does not answer at all")
    p.add_argument("--service", default="",
                   help="service name to ask about (default '': the server as a whole)")
    args = p.parse_args(argv)
    # gRPC honours proxy variables (grpc_proxy, https_proxy, http_proxy); a container
    # that inherits the daemon's proxy settings would send even localhost through it.
    # A health check always means the address as given, so drop them for this process.
    for var in ("grpc_proxy", "https_proxy", "http_proxy"):
        os.environ.pop(var, None)
        os.environ.pop(var.upper(), None)
    try:
        # Retries until SERVING or the deadline: a server that is still binding its port
        # or finishing a load step gets the whole --timeout, not one shot.
        wait_healthy(args.address, timeout=args.timeout, service=args.service)
    except TimeoutError as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
