"""Prometheus metrics of one gateway (served at /metrics). Latencies are observed per
request by the pipeline; instance gauges are refreshed from the registry view when
scraped, so they show what routing sees."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0)
_TOKEN = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
          1.0, 2.5)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=_LATENCY)
        self.tpot = Histogram("tandem_time_per_output_token_seconds",
                              "mean time per output token after the first, per request", registry=r, buckets=_TOKEN)
        self.itl = Histogram("tandem_inter_token_latency_seconds", "time between streamed token messages",
                             registry=r, buckets=_TOKEN)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "arrival to last token", registry=r,
                             buckets=_LATENCY)
        self.queue_time = Histogram("tandem_request_queue_time_seconds", "time waiting for an admission slot",
                                    registry=r, buckets=_LATENCY)
        self.requests = Counter("tandem_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter("tandem_cached_prompt_tokens",
                                     "prompt tokens decode already held (not prefilled again)", registry=r)
        self.generation_tokens = Counter("tandem_generation_tokens", "tokens generated", registry=r)
        self.transfer_bytes = Counter("tandem_kv_transfer_bytes", "KV bytes pushed from prefill to decode",
                                      registry=r)
        self.transfer_tokens = Counter("tandem_kv_transfer_tokens", "prompt tokens whose KV was pushed", registry=r)
        self.transfer_seconds = Histogram("tandem_kv_prefill_transfer_seconds",
                                          "remote prefill + KV transfer, as decode waited for it", registry=r,
                                          buckets=_LATENCY)
        self.routed = Counter("tandem_routed", "routing decisions by reason", ["reason"], registry=r)
        self.active = Gauge("tandem_active_requests", "requests streaming now", registry=r)
        self.queued = Gauge("tandem_queued_requests", "requests waiting for an admission slot", registry=r)
        self.instances = Gauge("tandem_instances", "live registered instances", ["role"], registry=r)
        self.kv_free = Gauge("tandem_instance_kv_blocks_free", "free KV blocks (global pool)", ["instance"],
                             registry=r)
        self.kv_total = Gauge("tandem_instance_kv_blocks_total", "KV blocks (global pool)", ["instance"], registry=r)
        self.inst_running = Gauge("tandem_instance_running", "requests running on an instance", ["instance"],
                                  registry=r)
        self.inst_waiting = Gauge("tandem_instance_waiting", "requests queued on an instance", ["instance"],
                                  registry=r)
        self.prefill_queued = Gauge("tandem_instance_queued_prefill_tokens", "prompt tokens queued on a prefill",
                                    ["instance"], registry=r)

    def render(self, instances) -> bytes:
        for g in (self.kv_free, self.kv_total, self.inst_running, self.inst_waiting, self.prefill_queued):
            g.clear()
        for role in ("prefill", "decode"):
            self.instances.labels(role).set(sum(1 for i in instances if i.role == role))
        for i in instances:
            self.kv_free.labels(i.id).set(i.free_blocks)
            self.kv_total.labels(i.id).set(i.total_blocks)
            self.inst_running.labels(i.id).set(i.running)
            self.inst_waiting.labels(i.id).set(i.waiting)
            if i.role == "prefill":
                self.prefill_queued.labels(i.id).set(i.queued_prefill_tokens)
        return generate_latest(self.registry)
