"""KV transfer throughput on two GPUs: tandem's NCCL backend against raw NCCL send/recv,
all timed in this call by the same two processes.

    python bench/kv_transfer.py [--tokens 32000] [--layers 48] [--reps 5] [--min-direct-blocks N]
                                [--json OUT] [--profile]
    python bench/kv_transfer.py --cpu [--profile]   # the same code and message pattern on CPU, gloo

The workload is one Scout-shaped prompt of --tokens tokens: 8 KV heads x 128 x bf16,
16-token blocks (64 KiB a block per layer, 32 KiB of it K). Global layers (every 4th)
carry every block; the chunked-local layers only the last 8192-token chunk's blocks --
what prefill pushes to decode. Sender on cuda:0, receiver on cuda:1, each its own
process. Rows:

  raw NCCL, per-layer messages   one 2-rank group, one send/recv per layer, back to back:
                                 the baseline ("vs raw")
  raw NCCL, coalesced messages   the same bytes, layers grouped as the sender coalesces
                                 them when all are queued (up to max_message_bytes), one
                                 op per group
  tandem nccl, fresh pool, ungrouped   NcclSender/NcclReceiver with consecutive block ids
                                 on both sides, as a fresh pool hands them out: every
                                 layer is one direct run (no gather, no staging); one NCCL
                                 launch per op (NcclReceiver.group_ops = False)
  tandem nccl, fresh pool        the same with a message's ops as one NCCL group (what
                                 make_sender("nccl") / make_receiver("nccl") build)
  tandem nccl, fragmented pool   src ids shuffled, dst ids descending: no run at all, every
                                 block staged (gathered, sent, scattered), as before
                                 direct runs existed; ops grouped
  fresh pool, writer thread only  the same with every message written by the sender's
                                 writer thread (NcclSender.write_inline = False)
  fresh pool, torch CUDA events (before)   (GPU only) the default with torch.cuda.Event
                                 for every per-message event call (ctypes_events = False
                                 on both sides), each of which lets go of the GIL; the
                                 default calls the CUDA driver through ctypes and keeps it
  ..., torch ProcessGroupNCCL    (GPU only, first) the fresh and fragmented rows with the
                                 pair's ops posted through torch.distributed
                                 (pg_backend "nccl-torch") instead of NCCL through ctypes
For each tandem row: first send_layer of a transfer -> DONE on both sides (the later of
the two; the sender's DONE is the receiver's answer to finish, a round trip after the
last byte), and -> DONE on the receiver alone ("landed": every byte in the cache, the
receiver's stream synced; what decode waits for, and what the raw rows time: the
receiver's recvs complete); send_layer called back to back for every layer with fresh slices of one block
table per layer group (as prefill does), then finish. Rows that group alike share one
sender/receiver pair (the receiver decides the grouping at connect).

Then, per tandem row and side, each stage's wall time per transfer, its thread's CPU time
in it, and its calls (stages on different threads overlap; wall far above CPU means the
stage waited -- for the GIL, a lock, a socket, the driver), each transfer thread's CPU
time per parts message (from /proc: the reader, the completer, the writer...), the
blocks that went direct and staged per transfer, and the parts messages per transfer.
Medians over --reps timed repetitions after one warm-up.

--cpu: the caches are CPU tensors and the pair's group gloo (the NCCL backend's control
flow, as the tests run it; grouped rows take gloo through NCCL's grouping calls). The
message pattern is the GPU run's -- the same block counts per layer, min_direct_blocks
and coalescing cap in blocks -- with 1 KV head of 8 dims instead of 8 x 128 (512 B a
block), so the Python per message is what it is on the GPU, minus the CUDA calls; times
mean nothing there, CPU per message does. With --profile (CPU) each side's threads run
under cProfile with a CPU-time clock during the timed repetitions, and each thread's
top functions per parts message are printed. With --profile on GPUs, a torch.profiler
table of the receiver's last transfer of the first tandem row.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import queue
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kv_transfer import CacheLayout, NcclReceiver, NcclSender  # noqa: E402
from kv_transfer.data_plane import DIRECT_MIN_K_BYTES  # noqa: E402
from protos.grpc_server import GIL_SWITCH_INTERVAL_US  # noqa: E402

BS, CHUNK = 16, 8192  # tokens per block, Scout's attention chunk
GPU_HEADS = (8, 128)  # Scout: KV heads x head dim; bf16 blocks of 64 KiB (K and V, one layer)
CPU_HEADS = (1, 8)  # --cpu: the same block counts, 512 B blocks


def block_bytes(heads: tuple[int, int]) -> int:
    """K and V of one bf16 block of one layer."""
    return 2 * BS * heads[0] * heads[1] * 2


# The GPU run's sender defaults, in blocks: the CPU run keeps them so messages and runs match.
GPU_MIN_DIRECT_BLOCKS = DIRECT_MIN_K_BYTES // (block_bytes(GPU_HEADS) // 2)  # 64
GPU_MESSAGE_BLOCKS = NcclSender.max_message_bytes // block_bytes(GPU_HEADS)  # 4096


class GlooSender(NcclSender):
    pg_backend = "gloo-grouped"  # grouped or not as the receiver says, like NCCL


class GlooReceiver(NcclReceiver):
    pg_backend = "gloo-grouped"


@dataclass(frozen=True)
class Config:
    blocks: dict[int, int]  # layer -> blocks pushed
    reps: int
    cpu: bool
    profile: bool
    min_direct_blocks: int | None  # the sender's option; None: its default (on CPU: the GPU run's)
    message_blocks: int = GPU_MESSAGE_BLOCKS  # the sender's coalescing cap, in blocks
    timeline: bool = False  # print the last transfer's stage timeline per row
    switch_interval_us: int | None = None  # sys.setswitchinterval in both processes; None: Python's

    @property
    def heads(self) -> tuple[int, int]:
        return CPU_HEADS if self.cpu else GPU_HEADS

    @property
    def block_bytes(self) -> int:
        return block_bytes(self.heads)

    @property
    def max_message_bytes(self) -> int:
        return self.message_blocks * self.block_bytes

    def device(self, rank: int) -> str:
        return "cpu" if self.cpu else f"cuda:{rank}"

    def sync(self) -> None:
        if not self.cpu:
            torch.cuda.synchronize()


@dataclass(frozen=True)
class Variant:
    name: str
    ids: str  # "consecutive" (a fresh pool) or "fragmented"
    group_ops: bool  # NcclReceiver.group_ops
    pg_backend: str = "nccl"  # the pair's group (kv_transfer.nccl.PG_BACKENDS); GPU only
    write_inline: bool = True  # NcclSender.write_inline: the caller writes when the link is idle
    ctypes_events: bool = True  # both sides' ctypes_events: CUDA events through the driver; GPU only

    @property
    def pair(self) -> tuple[bool, str, bool]:
        """Rows with the same pair settings share one sender/receiver pair."""
        return self.group_ops, self.pg_backend, self.ctypes_events


# Rows in this order: torch's ProcessGroupNCCL first (the data plane before ctypes NCCL),
# then the default; consecutive rows with the same pair settings share one pair.
VARIANTS = (Variant("fresh pool, torch ProcessGroupNCCL", "consecutive", True, "nccl-torch"),
            Variant("fragmented pool, torch ProcessGroupNCCL", "fragmented", True, "nccl-torch"),
            Variant("fresh pool, ungrouped", "consecutive", False),
            Variant("fresh pool, writer thread only", "consecutive", True, write_inline=False),
            Variant("fresh pool, torch CUDA events (before)", "consecutive", True, ctypes_events=False),
            Variant("fresh pool", "consecutive", True),
            Variant("fragmented pool", "fragmented", True))
# --cpu: gloo stands in for both group kinds, and there are no CUDA events
CPU_VARIANTS = tuple(v for v in VARIANTS if v.pg_backend == "nccl" and v.ctypes_events)


def variants(cfg) -> tuple[Variant, ...]:
    return CPU_VARIANTS if cfg.cpu else VARIANTS


def block_tables(blocks: dict[int, int], ids: str) -> dict[int, tuple[list[int], list[int]]]:
    """Per pool size n (one pool per layer group): the (src, dst) block tables of the
    prompt, both processes alike. consecutive: 0..n-1 on both sides. fragmented: src a
    seeded shuffle, dst descending, so no neighbours are consecutive on both sides."""
    tables = {}
    for n in sorted(set(blocks.values())):
        if ids == "consecutive":
            tables[n] = (list(range(n)), list(range(n)))
        else:
            src = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
            tables[n] = (src, list(range(n - 1, -1, -1)))
    return tables


def plan(tokens: int, layers: int) -> dict[int, int]:
    """layer -> number of blocks pushed."""
    total = -(-tokens // BS)
    first_local = (tokens // CHUNK) * CHUNK // BS
    return {i: (total if (i + 1) % 4 == 0 else total - first_local) for i in range(layers)}


def coalesced_groups(blocks: dict[int, int], cap: int, nbytes_per_block: int) -> list[int]:
    """Bytes of each message when every layer is queued at once: consecutive layers while
    the total stays within cap (the rule of TcpSender._next_batch)."""
    groups: list[int] = []
    for n in blocks.values():
        nbytes = n * nbytes_per_block
        if groups and groups[-1] + nbytes <= cap:
            groups[-1] += nbytes
        else:
            groups.append(nbytes)
    return groups


STAGES: dict[str, list[float]] = {}  # stage -> [wall s, thread CPU s, calls], per process
TRACE: list[tuple[str, float, float]] = []  # (stage, start, end) wall times of the current transfer, per process
SKIP_CODES: set = set()  # the stage timers' code: left out of profiles


def timed(cls, name: str) -> None:
    """Wrap cls.name to add its wall time and its thread's CPU time to STAGES. Wall well
    above CPU means the stage waited: for the GIL (another thread running Python), a
    lock, a socket or the GPU driver."""
    fn = getattr(cls, name)

    def wrapper(*a, **k):
        t0, c0 = time.time(), time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            t1 = time.time()
            st = STAGES.setdefault(name, [0.0, 0.0, 0])
            st[0] += t1 - t0
            st[1] += time.thread_time() - c0
            st[2] += 1
            TRACE.append((name, t0, t1))

    SKIP_CODES.add(wrapper.__code__)
    setattr(cls, name, wrapper)


def per_transfer(stages: dict[str, list[float]], transfers: int) -> dict[str, list[float]]:
    return {k: [v / transfers for v in vals] for k, vals in stages.items()}


# Transfer threads by name prefix (first match wins), as kv_transfer names them; the
# bench's own main thread is the sender's caller (send_layer) and the receiver's expect().
THREAD_ROLES = (("kv-send-write-", "writer"), ("kv-send-read-", "ack reader"), ("kv-recv-write-", "completer"),
                ("kv-recv-accept-", "accept"), ("kv-recv-", "reader"), ("MainThread", "caller"))


def thread_role(name: str) -> str | None:
    return next((role for prefix, role in THREAD_ROLES if name.startswith(prefix)), None)


def task_cpu_s(tid: int) -> float | None:
    """A thread's CPU seconds so far (Linux /proc: schedstat in ns, else stat in clock ticks)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # from field 3 (state) on
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's transfer threads, by role (the threads of one
    role add up). Read from /proc: no overhead on the threads themselves."""
    out: dict[str, float] = {}
    for t in threading.enumerate():
        role = thread_role(t.name)
        cpu = None if role is None else task_cpu_s(t.native_id)
        if cpu is not None:
            out[role] = out.get(role, 0.0) + cpu
    return out


class ThreadProfiles:
    """--profile on CPU: every transfer thread of this process runs under a cProfile of its
    own with a CPU-time clock, so time spent blocked (a queue, a socket, a sleep) does not
    count; so do the public calls the main thread makes. snapshot() before and after the
    timed repetitions gives what they cost."""

    def __init__(self) -> None:
        self.profilers: list[tuple[str, cProfile.Profile]] = []
        self.caller = self._new("caller")
        self.in_call = False

    def _new(self, role: str) -> cProfile.Profile:
        prof = cProfile.Profile(time.thread_time)
        self.profilers.append((role, prof))
        return prof

    def wrap_loop(self, cls, name: str) -> None:
        """cls.name is a thread's loop: run it under a profiler of its own."""
        fn = getattr(cls, name)

        def profiled_loop(*a, **k):
            prof = self._new(thread_role(threading.current_thread().name) or name)
            prof.enable()
            try:
                return fn(*a, **k)
            finally:
                prof.disable()

        setattr(cls, name, profiled_loop)

    def wrap_call(self, cls, name: str) -> None:
        """cls.name is a public method the main thread calls: profile each call."""
        fn = getattr(cls, name)

        def profiled_call(*a, **k):
            if self.in_call or threading.current_thread() is not threading.main_thread():
                return fn(*a, **k)
            self.in_call = True
            self.caller.enable()
            try:
                return fn(*a, **k)
            finally:
                self.caller.disable()
                self.in_call = False

        setattr(cls, name, profiled_call)

    def snapshot(self) -> dict[tuple[str, str], list[float]]:
        """(thread role, function) -> [calls, self CPU s, cumulative CPU s] so far, over
        finished calls (getstats() reads a running profiler without stopping it)."""
        out: dict[tuple[str, str], list[float]] = {}
        for role, prof in self.profilers:
            for e in prof.getstats():
                code = e.code
                if code in SKIP_CODES:
                    continue  # the bench's own stage timers
                name = (f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}({code.co_name})"
                        if hasattr(code, "co_filename") else str(code))
                row = out.setdefault((role, name), [0, 0.0, 0.0])
                row[0] += e.callcount
                row[1] += e.inlinetime
                row[2] += e.totaltime
        return out


def difference(after: dict, before: dict, transfers: int) -> dict:
    """after - before per key, per transfer (values: numbers or lists of numbers)."""
    def per(a, b):
        if isinstance(a, list):
            return [(x - y) / transfers for x, y in zip(a, b or [0] * len(a))]
        return (a - (b or 0)) / transfers
    return {k: per(v, before.get(k)) for k, v in after.items()}


class Probe:
    """Per-thread CPU (and, profiling on CPU, cProfile stats) of the timed repetitions."""

    def __init__(self, cfg: Config, cls: type, loops: tuple[str, ...], calls: tuple[str, ...]):
        self.profiles = ThreadProfiles() if cfg.profile and cfg.cpu else None
        if self.profiles is not None:
            for name in loops:
                self.profiles.wrap_loop(cls, name)
            for name in calls:
                self.profiles.wrap_call(cls, name)
        self.before: tuple = ()

    def _now(self) -> tuple:
        return thread_cpu(), ({} if self.profiles is None else self.profiles.snapshot())

    def begin(self) -> None:
        self.before = self._now()

    def end(self, transfers: int) -> tuple[dict, dict]:
        """(role -> CPU s, (role, function) -> [calls, self s, cum s]), per transfer since begin()."""
        after = self._now()
        return tuple(difference(a, b, transfers) for a, b in zip(after, self.before))


def device_allocs(cfg: Config, rank: int) -> int:
    """cudaMalloc (or cuMemMap) calls so far by this process's caching allocator: a
    transfer that needs any means its staging buffers did not come from the cache."""
    return 0 if cfg.cpu else torch.cuda.memory_stats(rank).get("num_device_alloc", -1)


# Timed methods (nested ones included: send_layer contains _block_ids and _stage, _stage
# contains _gather, _send_parts contains _transmit, _on_parts contains _take_data).
SENDER_STAGES = ("send_layer", "_block_ids", "_stage", "_gather", "_send_parts", "_transmit")
RECEIVER_STAGES = ("_on_parts", "_take_data", "_await_data", "_write_part", "_reply")


def raw_p2p(cfg: Config, rank: int, sizes: list[int]) -> float | None:
    """One send (rank 0) / recv (rank 1) per entry of sizes (bytes), back to back, on the
    default group; the receiver's median seconds (None on the sender)."""
    import torch.distributed as dist

    bufs = [torch.empty(n, dtype=torch.uint8, device=cfg.device(rank)) for n in sizes]
    times = []
    for r in range(cfg.reps + 1):
        dist.barrier()
        cfg.sync()
        t0 = time.perf_counter()
        for b in bufs:
            (dist.send if rank == 0 else dist.recv)(b, 1 - rank)
        cfg.sync()
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) if rank == 1 else None


def raw_rows(cfg: Config, rank: int, port: int, results) -> None:
    import torch.distributed as dist

    if not cfg.cpu:
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if cfg.cpu else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=2)
    per_layer = [n * cfg.block_bytes for n in cfg.blocks.values()]
    for name, sizes in (("per-layer", per_layer),
                        ("coalesced", coalesced_groups(cfg.blocks, cfg.max_message_bytes, cfg.block_bytes))):
        t = raw_p2p(cfg, rank, sizes)
        if t is not None:
            results.put(("raw", name, len(sizes), t))
    dist.destroy_process_group()


def caches(cfg: Config, rank: int) -> list[torch.Tensor]:
    return [torch.randn(2, n + 8, BS, *cfg.heads, device=cfg.device(rank)).to(torch.bfloat16)
            for n in cfg.blocks.values()]


def by_path(before: dict[str, int], after: dict[str, int], transfers: int) -> dict[str, float]:
    return {k: (after[k] - before[k]) / transfers for k in ("blocks_direct", "blocks_staged")}


def receiver(cfg: Config, port: int, to_sender, to_receiver, results) -> None:
    if cfg.switch_interval_us:
        sys.setswitchinterval(cfg.switch_interval_us / 1e6)
    raw_rows(cfg, 1, port, results)
    for name in RECEIVER_STAGES:
        timed(NcclReceiver, name)
    probe = Probe(cfg, NcclReceiver, ("_serve", "_complete_loop"), ("expect", "wait", "release"))
    kv = caches(cfg, 1)
    rx, pair = None, None
    for v in variants(cfg):
        if rx is None or pair != v.pair:  # a new pair: the receiver groups or not at connect
            if rx is not None:
                assert to_receiver.get() == "closed"  # the sender hung up first: no 'connection lost' noise
                rx.close()
            rx = (GlooReceiver if cfg.cpu else NcclReceiver)(CacheLayout.from_caches("bench", kv), kv)
            rx.group_ops, rx.ctypes_events, pair = v.group_ops, v.ctypes_events, v.pair
            if not cfg.cpu:
                rx.pg_backend = v.pg_backend
            to_sender.put(rx.address)
        tables = block_tables(cfg.blocks, v.ids)
        STAGES.clear()
        counts = rx.stats()
        for r in range(cfg.reps + 1):
            if r == 1:
                probe.begin()
            tid = f"{v.name}-{r}"
            TRACE.clear()
            rx.expect(tid, {i: tables[n][1][:n] for i, n in cfg.blocks.items()})
            prof = None
            if cfg.profile and not cfg.cpu and r == cfg.reps and v.name == "fresh pool":
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
            to_sender.put("ready")
            st = rx.wait(tid, 120)
            t_done = time.time()
            if prof is not None:
                cfg.sync()
                prof.__exit__(None, None, None)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
                print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8), flush=True)
            results.put(("rx", v.name, r, st.name, t_done))
            to_receiver.get()  # release only after the sender's finish was answered
            rx.release(tid)
            if r == 0:  # after the warm-up
                allocs = device_allocs(cfg, 1)
        results.put(("stages", v.name, "receiver", per_transfer(STAGES, cfg.reps + 1),
                     (device_allocs(cfg, 1) - allocs) / cfg.reps, by_path(counts, rx.stats(), cfg.reps + 1),
                     *probe.end(cfg.reps), list(TRACE)))
    assert to_receiver.get() == "closed"
    rx.close()


def sender(cfg: Config, port: int, to_sender, to_receiver, results) -> None:
    if cfg.switch_interval_us:
        sys.setswitchinterval(cfg.switch_interval_us / 1e6)
    raw_rows(cfg, 0, port, results)
    for name in SENDER_STAGES:
        timed(NcclSender, name)
    probe = Probe(cfg, NcclSender, ("_write_loop", "_read_loop"), ("send_layer", "finish", "wait", "release"))
    kv = caches(cfg, 0)
    tx, pair = None, None
    for v in variants(cfg):
        if tx is None or pair != v.pair:  # the receiver opened a new pair
            if tx is not None:
                tx.close()
                to_receiver.put("closed")
            tx = (GlooSender if cfg.cpu else NcclSender)(CacheLayout.from_caches("bench", kv), kv,
                                                         min_direct_blocks=cfg.min_direct_blocks)
            tx.max_message_bytes = cfg.max_message_bytes
            tx.ctypes_events = v.ctypes_events  # before connect: the pair's communicator takes it then
            if not cfg.cpu:
                tx.pg_backend = v.pg_backend
            pair = v.pair
            address = to_sender.get()
            tx.connect(address)
        tx.write_inline = v.write_inline
        tables = block_tables(cfg.blocks, v.ids)
        STAGES.clear()
        counts = tx.stats()
        for r in range(cfg.reps + 1):
            if r == 1:
                probe.begin()
            tid = f"{v.name}-{r}"
            assert to_sender.get() == "ready"
            messages = tx.stats()["messages_sent"]
            # fresh slices of the tables per call, as prefill_service/push.py passes them
            cfg.sync()
            TRACE.clear()
            t0 = time.time()
            for i, n in cfg.blocks.items():
                src, dst = tables[n]
                tx.send_layer(address, tid, i, src[:n], dst[:n])
            tx.finish(address, tid, len(cfg.blocks))
            st = tx.wait(tid, 120)
            t_done = time.time()
            state = st.name + ("" if st.name == "DONE" else f" ({tx.reason(tid)})")
            results.put(("tx", v.name, r, state, t0, t_done, tx.stats()["messages_sent"] - messages))
            to_receiver.put("done")
            tx.release(tid)
            if r == 0:  # after the warm-up
                allocs = device_allocs(cfg, 0)
        results.put(("stages", v.name, "sender", per_transfer(STAGES, cfg.reps + 1),
                     (device_allocs(cfg, 0) - allocs) / cfg.reps, by_path(counts, tx.stats(), cfg.reps + 1),
                     *probe.end(cfg.reps), list(TRACE)))
    tx.close()
    to_receiver.put("closed")


def next_result(results, procs, timeout: float = 600):
    """The next message from the workers; RuntimeError as soon as one of them died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            for p in procs:
                if p.exitcode not in (None, 0):
                    raise RuntimeError(f"bench process {p.name} exited with {p.exitcode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no result from the bench processes in {timeout:.0f} s") from None


def row_of(cfg: Config, reps: dict, stages: dict, allocs: dict, paths: dict, cpu: dict) -> dict:
    """A tandem row from its per-rep results (the warm-up, rep 0, left out)."""
    times, landed, states, messages = [], [], set(), []
    for r in range(1, cfg.reps + 1):
        tx, rx = reps[r]["tx"], reps[r]["rx"]
        times.append(max(tx[5], rx[4]) - tx[4])
        landed.append(rx[4] - tx[4])
        states.add((tx[3], rx[3]))
        messages.append(tx[6])
    return {"s": statistics.median(times), "s_landed": statistics.median(landed), "states": sorted(states),
            "messages": statistics.median(messages),
            "stages_s": stages, "device_allocs": allocs, "blocks": paths, "thread_cpu_s": cpu}


def print_timeline(traces: dict[str, list], rep: dict) -> None:
    """The last timed transfer's stages on one clock, in ms from the first send_layer:
    each stage's calls as start-end, in call order (where the link waited on whom)."""
    t0, done = rep["tx"][4], max(rep["tx"][5], rep["rx"][4])
    print(f"  timeline of the last transfer (ms from the first send_layer; DONE at {1e3 * (done - t0):.2f}):")
    for side, names in (("sender", SENDER_STAGES), ("receiver", RECEIVER_STAGES)):
        for name in names:
            spans = [(a, b) for n, a, b in traces.get(side, []) if n == name]
            if spans:
                print(f"    {side} {name}: " + " ".join(f"{1e3 * (a - t0):.2f}-{1e3 * (b - t0):.2f}" for a, b in spans))


def print_profile(side: str, stats: dict, messages: float, top: int = 10) -> None:
    """Each thread's top functions by own CPU, per parts message."""
    for role in sorted({role for role, _ in stats}):
        rows = sorted(((v, name) for (r, name), v in stats.items() if r == role and v[0] > 0),
                      key=lambda x: -x[0][1])
        print(f"    {side} {role}: own / with callees us, calls per parts message")
        for (calls, own, cum), name in rows[:top]:
            print(f"      {1e6 * own / messages:8.1f} {1e6 * cum / messages:8.1f} {calls / messages:7.2f}  {name}")


def run(cfg: Config) -> dict:
    """Both processes, every row; returns the results. Each table row is printed as soon
    as it is complete, so a row that fails still leaves the ones before it."""
    nbytes = sum(cfg.blocks.values()) * cfg.block_bytes
    ctx = mp.get_context("spawn")
    results, to_sender, to_receiver = ctx.Queue(), ctx.Queue(), ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=fn, args=(cfg, port, to_sender, to_receiver, results)) for fn in (sender, receiver)]
    for p in procs:
        p.start()
    raw, tandem, stages, allocs, paths, cpu, profiles, rows, traces = {}, {}, {}, {}, {}, {}, {}, {}, {}
    expected = 2 + 2 * len(variants(cfg)) * (cfg.reps + 2)  # raw rows; per variant: tx and rx per rep, stages of each
    for _ in range(expected):
        m = next_result(results, procs)
        if m[0] == "raw":
            raw[m[1]] = {"messages": m[2], "s": m[3]}
            if len(raw) == 2:
                print(f"\n{nbytes / 1e9:.2f} GB in {len(cfg.blocks)} layers; medians of {cfg.reps}\n")
                print("| what | messages | time | GB/s | vs raw per-layer | landed on the receiver (vs raw) "
                      "| blocks direct / staged |\n|---|---|---|---|---|---|---|")
                for name, r in raw.items():
                    print(f"| raw {'gloo' if cfg.cpu else 'NCCL'}, {name} messages | {r['messages']} | "
                          f"{r['s'] * 1e3:.1f} ms | {nbytes / r['s'] / 1e9:.1f} | "
                          f"{100 * raw['per-layer']['s'] / r['s']:.0f}% | | |", flush=True)
        elif m[0] == "stages":
            stages.setdefault(m[1], {}).update(m[3])
            allocs.setdefault(m[1], {})[m[2]] = m[4]
            paths.setdefault(m[1], {})[m[2]] = m[5]
            cpu.setdefault(m[1], {})[m[2]] = m[6]
            profiles.setdefault(m[1], {})[m[2]] = m[7]
            traces.setdefault(m[1], {})[m[2]] = m[8]
            if len(paths[m[1]]) == 2:  # both sides are done with this row
                r = rows[m[1]] = row_of(cfg, tandem[m[1]], stages[m[1]], allocs[m[1]], paths[m[1]], cpu[m[1]])
                b = r["blocks"]["sender"]
                print(f"| tandem nccl, {m[1]} | {r['messages']:g} | {r['s'] * 1e3:.1f} ms "
                      f"| {nbytes / r['s'] / 1e9:.1f} | {100 * raw['per-layer']['s'] / r['s']:.0f}% "
                      f"| {r['s_landed'] * 1e3:.1f} ms ({100 * raw['per-layer']['s'] / r['s_landed']:.0f}%) "
                      f"| {b['blocks_direct']:g} / {b['blocks_staged']:g} |", flush=True)
        else:
            tandem.setdefault(m[1], {}).setdefault(m[2], {})[m[0]] = m
    for p in procs:
        p.join(timeout=60)
    print()
    for variant, r in rows.items():
        print(f"{variant}: states {r['states']}; cudaMalloc calls per timed transfer: "
              + ", ".join(f"{side} {n:g}" for side, n in sorted(r["device_allocs"].items()))
              + "; blocks direct/staged per transfer: "
              + ", ".join(f"{side} {b['blocks_direct']:g}/{b['blocks_staged']:g}" for side, b in sorted(r["blocks"].items())))
        print("  per transfer, each stage's wall ms (its thread's CPU ms) / calls:")
        for side, names in (("sender", SENDER_STAGES), ("receiver", RECEIVER_STAGES)):
            print(f"    {side}: " + ", ".join(f"{k} {1e3 * w:.2f} ({1e3 * c:.2f}) / {n:.3g}"
                                           for k in names if k in r["stages_s"]
                                           for w, c, n in [r["stages_s"][k]]))
        msgs = r["messages"] or 1
        print(f"  per parts message ({msgs:g} a transfer), each thread's CPU ms: " + "; ".join(
            f"{side} " + ", ".join(f"{role} {1e3 * t / msgs:.3f}" for role, t in sorted(r["thread_cpu_s"][side].items()))
            for side in ("sender", "receiver")))
        for side in ("sender", "receiver"):
            if profiles[variant][side]:
                print_profile(side, profiles[variant][side], msgs)
        if cfg.timeline:
            print_timeline(traces[variant], tandem[variant][cfg.reps])
    return {"bytes": nbytes, "raw": raw, "tandem": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32000, help="prompt tokens whose KV moves (default 32000)")
    ap.add_argument("--layers", type=int, default=48, help="layers (default 48, Scout)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions after one warm-up (default 5)")
    ap.add_argument("--min-direct-blocks", type=int,
                    help=f"the sender's shortest direct run (default: its own on GPUs, 2 MiB of K = "
                         f"{GPU_MIN_DIRECT_BLOCKS} blocks; the same {GPU_MIN_DIRECT_BLOCKS} with --cpu)")
    ap.add_argument("--max-message-mib", type=int,
                    help=f"the sender's coalescing cap on GPUs (default {NcclSender.max_message_bytes >> 20} MiB, "
                         "its own; --cpu keeps the same cap in blocks)")
    ap.add_argument("--timeline", action="store_true",
                    help="print each row's last transfer as a timeline of its stages on both sides")
    ap.add_argument("--switch-interval-us", type=int, default=GIL_SWITCH_INTERVAL_US,
                    help="the GIL switch interval of both processes (sys.setswitchinterval; default "
                         f"{GIL_SWITCH_INTERVAL_US}, what the services set; Python's own is 5000)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", action="store_true",
                    help="GPUs: a torch.profiler table of the receiver's last transfer of the first tandem row; "
                         "--cpu: each thread's top functions (cProfile, CPU time) per parts message")
    ap.add_argument("--cpu", action="store_true", help="CPU tensors with gloo, 512 B blocks (no GPU needed)")
    args = ap.parse_args(argv)
    if min(args.reps, args.tokens, args.layers, args.min_direct_blocks or 1, args.max_message_mib or 1) < 1:
        ap.error("--reps, --tokens, --layers, --min-direct-blocks and --max-message-mib must be >= 1")
    if not args.cpu and torch.cuda.device_count() < 2:
        ap.error(f"needs 2 GPUs, found {torch.cuda.device_count()} (use --cpu for a smoke run)")
    tokens, layers = args.tokens, args.layers
    min_direct = args.min_direct_blocks or (GPU_MIN_DIRECT_BLOCKS if args.cpu else None)
    message_blocks = GPU_MESSAGE_BLOCKS
    if args.max_message_mib:
        message_blocks = max(1, (args.max_message_mib << 20) // block_bytes(GPU_HEADS))
    cfg = Config(plan(tokens, layers), args.reps, args.cpu, args.profile, min_direct, message_blocks,
                 args.timeline, args.switch_interval_us)
    where = "CPU, gloo" if args.cpu else f"{torch.cuda.device_count()} GPUs: {torch.cuda.get_device_name(0)}"
    print(f"{where}; {tokens} tokens, {layers} layers; torch {torch.__version__}", flush=True)
    out = run(cfg)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
