"""`tandem bench serve` (one run) and `tandem bench sweep` (rates x configurations).

Flags follow `vllm bench serve` where the meaning is the same, so its users' command lines
and result-reading scripts carry over. This module only turns flags into configs
(`config_from_args`, `sweep_config_from_args`), calls `bench.run_benchmark` /
`sweep.run_sweep`, and prints and writes what they return. From Python (e.g. a test):

    from loadtest.cli import config_from_argv
    from loadtest.bench import run_benchmark
    result = run_benchmark(config_from_argv(["--base-url", url, "--num-prompts", "30"]))
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import replace
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)



class _FORMATTER(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help unless X is empty or the help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if action.option_strings and not empty and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_command", required=True, metavar="{serve,sweep}")
    serve = sub.add_parser(
        "serve", formatter_class=_FORMATTER, help="benchmark one running server (like vllm bench serve)",
        description="Send a workload to a running server at a request rate and/or concurrency; print a "
                    "result table and write a JSON result whose keys match vllm bench serve's.")
    g = serve.add_argument_group("server")
    g.add_argument("--base-url", help="server URL, e.g. http://127.0.0.1:8000 (grpc: grpc://HOST:PORT); "
                                      "overrides --host/--port")
    g.add_argument("--host", default="127.0.0.1", help="server host, when --base-url is not given")
    g.add_argument("--port", type=int, default=8000, help="server port, when --base-url is not given")
    _add_request_arguments(serve)
    _add_workload_arguments(serve)
    g = _add_load_arguments(serve)
    g.add_argument("--request-rate", type=_rate, default=math.inf,
                   help="requests per second, Poisson arrivals (sessions: sessions per second); inf sends them "
                        "all at once")
    _add_metric_arguments(serve)
    _add_output_arguments(serve, plot_default=False,
                          plot_help="also write the latency CDFs (TTFT, TPOT, ITL, E2E) as a PNG next to the JSON")

    sweep = sub.add_parser(
        "sweep", formatter_class=_FORMATTER, help="rates x configurations: one table, one JSON, one plot",
        description="Run the same workload at each rate against each configuration (a running server, "
                    "or a stack the sweep starts and stops), then print one comparison table and write "
                    "one JSON and one plot (goodput and p50/p90 latencies against the rate).")
    g = sweep.add_argument_group("configurations")
    g.add_argument("--base-url", action="append", default=[], type=_named, metavar="NAME=URL",
                   help="a running server to compare (repeatable)")
    g.add_argument("--stack", action="append", default=[], type=_named, metavar="NAME=COMMAND",
                   help="a shell command that starts a stack; the sweep starts it in its own process "
                        "group, waits for it to be ready, runs the rates and stops it (repeatable)")
    g.add_argument("--stack-url", action="append", default=[], type=_named, metavar="NAME=URL",
                   help="where the stack NAME serves (one per --stack)")
    g.add_argument("--stack-start-timeout", type=float, default=600.0,
                   help="seconds a stack may take to answer GET /health with 200 (grpc: ListModels)")
    g.add_argument("--stack-stop-timeout", type=float, default=30.0,
                   help="seconds between SIGINT and SIGTERM when stopping a stack (then SIGKILL after 10 s)")
    g.add_argument("--rates", type=_rates, default="1,2,4,inf",
                   help="comma-separated request rates (req/s) to run, in order; inf = all at once")
    _add_request_arguments(sweep)
    _add_workload_arguments(sweep)
    _add_load_arguments(sweep)
    _add_metric_arguments(sweep)
    _add_output_arguments(sweep, plot_default=True,
                          plot_help="write the comparison plot (goodput and p50/p90 latencies against rate)")


def _add_request_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("requests")
    g.add_argument("--backend", default="openai", choices=["openai", "grpc"],
                   help="openai: REST with SSE streaming; grpc: the tandem.api.v1.Tandem service")
    g.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"],
                   help="REST endpoint (grpc: chat selects the Chat RPC, else Generate)")
    g.add_argument("--model", help="model name to ask for (default: the server's first, from /v1/models "
                                   "or ListModels)")
    g.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (grpc: as metadata)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly the output length (ignore end-of-sequence tokens)")
    g.add_argument("--request-timeout", type=float, default=3600.0,
                   help="seconds a whole request may take before it counts as failed ('timeout')")


def _add_workload_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset-name", default="random", choices=["random", "shared-prefix", "sessions", "jsonl"],
                   help="random token prompts; shared-prefix groups; multi-turn sessions; or a JSONL file")
    g.add_argument("--dataset-path", help="the JSONL file for --dataset-name jsonl: one object a line with "
                                          "'prompt' or 'prompt_ids', 'output_len', optional 'timestamp' (s) "
                                          "and 'session_id'")
    g.add_argument("--random-input-len", type=int, default=1024,
                   help="prompt tokens (shared-prefix: the suffix after the prefix; sessions: the first turn)")
    g.add_argument("--random-output-len", type=int, default=128, help="tokens to generate per request")
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="uniform lengths within [L*(1-R), L*(1+R)]; R > 0 makes uniform the default distribution")
    for which in ("input", "output"):
        g.add_argument(f"--{which}-len-distribution", choices=["fixed", "uniform", "lognormal"],
                       help=f"distribution of {which} lengths (default: uniform if --random-range-ratio > 0, "
                            "else fixed)")
    g.add_argument("--lognormal-sigma", type=float, default=0.5,
                   help="sigma of the lognormal length distribution (its mean is the given length)")
    g.add_argument("--vocab-size", type=int, default=32000, help="random token ids are drawn from [100, VOCAB_SIZE)")
    g.add_argument("--num-prefixes", "--prefix-repetition-num-prefixes", dest="prefix_groups", type=int, default=4,
                   help="shared-prefix: number of groups, each with its own common prefix")
    g.add_argument("--prefix-len", "--prefix-repetition-prefix-len", dest="prefix_len", type=int, default=512,
                   help="shared-prefix: tokens in each group's common prefix")
    g.add_argument("--session-turns", type=int, default=4,
                   help="sessions: turns per session; turn k+1 is sent when turn k has finished")
    g.add_argument("--session-turn-len", type=int, default=128,
                   help="sessions: new prompt tokens in each turn after the first (the server keeps the history)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrival times")


def _add_load_arguments(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("load")
    g.add_argument("--num-prompts", type=int,
                   help="measured requests (default: 1000; with --duration: unbounded; jsonl: the whole file)")
    g.add_argument("--duration", type=float, help="seconds after which no new request starts (running ones finish)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival times: 1 = Poisson, < 1 burstier, > 1 more even")
    g.add_argument("--max-concurrency", type=int,
                   help="most requests in flight at once (combines with --request-rate)")
    g.add_argument("--num-warmups", type=int, default=0,
                   help="requests sent (with their own prompts) before the measured run, not measured")
    return g


def _add_metric_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metrics")
    g.add_argument("--goodput", nargs="+", default=[], metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. --goodput ttft:200 tpot:50 e2el:5000 (milliseconds)")
    g.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO in ms (same as --goodput ttft:MS)")
    g.add_argument("--slo-tpot-ms", type=float, help="TPOT SLO in ms (same as --goodput tpot:MS)")
    g.add_argument("--metric-percentiles", default="90,99", help="comma-separated latency percentiles to report")


def _add_output_arguments(p: argparse.ArgumentParser, *, plot_default: bool, plot_help: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--result-dir", default=".", help="folder for the JSON result, plots and stack logs")
    g.add_argument("--result-filename", help="JSON file name (default: made from backend, rate, model and date)")
    g.add_argument("--save-result", action="store_true",
                   help="accepted for vllm bench serve compatibility: the result is always saved")
    g.add_argument("--save-detailed", action="store_true",
                   help="serve: also save the generated texts; sweep: also save every run's per-request arrays")
    g.add_argument("--plot", action=argparse.BooleanOptionalAction, default=plot_default, help=plot_help)
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rate must be a number or inf, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a rate must be > 0, got {text!r}")
    return rate


def _rates(text: str) -> tuple[float, ...]:
    rates = tuple(_rate(r.strip()) for r in text.split(",") if r.strip())
    if not rates:
        raise argparse.ArgumentTypeError("--rates needs at least one rate")
    return rates


def config_from_args(args: argparse.Namespace):
    """The BenchConfig of parsed `serve` (or `sweep`) flags; ValueError names a bad one."""
    from loadtest.arrivals import ArrivalConfig
    from loadtest.bench import BenchConfig
    from loadtest.clients import ClientConfig
    from loadtest.metrics import parse_goodput, parse_percentiles
    from loadtest.workloads import WorkloadConfig

    base_url = getattr(args, "base_url", None)
    if not isinstance(base_url, str):  # sweep: each configuration brings its own
        base_url = None
    if base_url is None:
        host = getattr(args, "host", "127.0.0.1")
        port = getattr(args, "port", 8000)
        base_url = f"{host}:{port}" if args.backend == "grpc" else f"http://{host}:{port}"
    client = ClientConfig(backend=args.backend, base_url=base_url, endpoint=args.endpoint, model=args.model,
                          api_key=args.api_key, temperature=args.temperature, ignore_eos=args.ignore_eos,
                          request_timeout=args.request_timeout)
    workload = WorkloadConfig(
        dataset_name=args.dataset_name, dataset_path=args.dataset_path, input_len=args.random_input_len,
        output_len=args.random_output_len, range_ratio=args.random_range_ratio,
        input_len_distribution=args.input_len_distribution, output_len_distribution=args.output_len_distribution,
        lognormal_sigma=args.lognormal_sigma, vocab_size=args.vocab_size, prefix_groups=args.prefix_groups,
        prefix_len=args.prefix_len, session_turns=args.session_turns, session_turn_len=args.session_turn_len,
        seed=args.seed)
    arrivals = ArrivalConfig(request_rate=getattr(args, "request_rate", math.inf), burstiness=args.burstiness,
                             max_concurrency=args.max_concurrency, duration=args.duration)
    slos = parse_goodput(args.goodput)
    for name, value in (("ttft", args.slo_ttft_ms), ("tpot", args.slo_tpot_ms)):
        if value is not None:
            slos.update(parse_goodput([f"{name}:{value}"]))
    num_prompts = args.num_prompts
    if num_prompts is None and args.duration is None and args.dataset_name != "jsonl":
        num_prompts = 1000
    return BenchConfig(client=client, workload=workload, arrivals=arrivals, num_prompts=num_prompts,
                       num_warmups=args.num_warmups, percentiles=parse_percentiles(args.metric_percentiles),
                       slos_ms=slos, progress=not args.disable_tqdm)


def sweep_config_from_args(args: argparse.Namespace):
    from loadtest.sweep import SweepConfig, Target

    urls = dict(args.stack_url)
    targets = [Target(name, url) for name, url in args.base_url]
    for name, command in args.stack:
        if name not in urls:
            raise ValueError(f"stack_url: --stack {name}=... needs a --stack-url {name}=URL")
        targets.append(Target(name, urls.pop(name), command))
    if urls:
        raise ValueError(f"stack_url: no --stack named {', '.join(sorted(urls))}")
    return SweepConfig(bench=config_from_args(args), targets=tuple(targets), rates=args.rates,
                       start_timeout=args.stack_start_timeout, stop_timeout=args.stack_stop_timeout,
                       log_dir=args.result_dir, keep_per_request=args.save_detailed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench", description="load testing of an OpenAI or tandem gRPC server")
    add_arguments(p)
    return p


def config_from_argv(argv: list[str]):
    """The BenchConfig of `tandem bench serve ARGV` (for tests and scripts)."""
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def run(args: argparse.Namespace) -> int:
    from loadtest.bench import ServerUnavailable
    from loadtest.sweep import StackError

    try:
        return _serve_command(args) if args.bench_command == "serve" else _sweep_command(args)
    except (ServerUnavailable, StackError) as e:
        print(f"tandem bench {args.bench_command}: error: {e}", file=sys.stderr)
        return 1


def _serve_command(args: argparse.Namespace) -> int:
    from loadtest.bench import run_benchmark
    from loadtest.metrics import format_result

    cfg = config_from_args(args)
    result = run_benchmark(cfg)
    print(format_result(result, cfg.percentiles))
    name = args.result_filename or _default_filename(result)
    saved = result if args.save_detailed else {k: v for k, v in result.items() if k != "generated_texts"}
    path = _write_json(saved, Path(args.result_dir) / name)
    if args.plot:
        from loadtest.plots import plot_latency_cdfs

        log.info("wrote %s", plot_latency_cdfs(result, path.with_suffix(".png")))
    return 0 if result["completed"] else 1


def _sweep_command(args: argparse.Namespace) -> int:
    from loadtest.sweep import format_sweep, run_sweep

    cfg = sweep_config_from_args(args)
    if 90.0 not in cfg.bench.percentiles:  # the table and the plot show p90
        cfg = replace(cfg, bench=replace(cfg.bench, percentiles=(*cfg.bench.percentiles, 90.0)))
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(args.result_dir) / (args.result_filename or f"sweep-{date}.json")
    sweep = run_sweep(cfg, on_run=lambda s: _write_json(s, path, quiet=True))
    _write_json(sweep, path)
    print(format_sweep(sweep))
    if args.plot and any(sweep["runs"].values()):
        from loadtest.plots import plot_sweep

        slos = ", ".join(f"{k} <= {v:g} ms" for k, v in cfg.bench.slos_ms.items())
        log.info("wrote %s", plot_sweep(sweep["runs"], path.with_suffix(".png"), title=f"SLOs: {slos}" if slos else ""))
    return 1 if sweep["errors"] else 0


def _default_filename(result: dict) -> str:
    concurrency = f"-concurrency{result['max_concurrency']}" if result["max_concurrency"] else ""
    model = str(result["model_id"]).rstrip("/").split("/")[-1]
    return f"{result['backend']}-{result['request_rate']}qps{concurrency}-{model}-{result['date']}.json"


def _write_json(obj: dict, path: Path, quiet: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)  # a reader never sees half a file
    if not quiet:
        log.info("wrote %s", path)
    return path
