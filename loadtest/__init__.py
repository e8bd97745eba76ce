"""Load-testing harness: `tandem bench serve` and `tandem bench sweep`.

    workloads.py  what is sent: random, shared-prefix, multi-turn sessions, JSONL replay
    arrivals.py   when: Poisson/gamma arrivals, a concurrency cap, a time bound
    clients.py    how: streaming OpenAI REST (aiohttp) and gRPC (grpc.aio) clients -> records
    metrics.py    records -> TTFT/TPOT/ITL/E2EL stats, throughput, goodput (vLLM's keys)
    bench.py      one run: BenchConfig -> run_benchmark() -> result dict
    sweep.py      rates x configurations, starting and stopping stacks
    plots.py      latency CDFs, and goodput/latency against rate
    cli.py        the flags (following vllm bench serve), printing and writing results
"""
