"""Prometheus text exposition, with vLLM's metric names under a `dormant:` prefix.

A tiny registry (counters, histograms, gauges read at scrape time) instead of a dependency:
the gateway needs a dozen series and no push, no multiprocess mode.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterable

from dormant.lifecycle.states import State

Labels = tuple[str, ...]

# vLLM's buckets for time to first token and end-to-end latency.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
START_BUCKETS = (0.05, 0.1, 0.25, 0.4, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Counter:
    def __init__(self, name: str, help: str, labelnames: Labels) -> None:
        self.name, self.help, self.labelnames = name, help, labelnames
        self._values: dict[Labels, float] = {}

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self._values[labels] = self._values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_fmt_labels(self.labelnames, k)} {_fmt_value(v)}" for k, v in self._values.items()]
        return out


class Histogram:
    def __init__(self, name: str, help: str, labelnames: Labels, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.labelnames, self.buckets = name, help, labelnames, buckets
        self._series: dict[Labels, list[float]] = {}  # per-bucket counts + [sum]

    def observe(self, labels: Labels, value: float) -> None:
        series = self._series.setdefault(labels, [0.0] * (len(self.buckets) + 2))
        series[bisect.bisect_left(self.buckets, value)] += 1  # index len(buckets): above all
        series[-1] += value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, series in self._series.items():
            cumulative = 0.0
            for bound, count in zip((*self.buckets, math.inf), series):
                cumulative += count
                le = 'le="' + ("+Inf" if math.isinf(bound) else repr(float(bound))) + '"'
                out.append(f"{self.name}_bucket{_fmt_labels(self.labelnames, labels, le)} {_fmt_value(cumulative)}")
            out.append(f"{self.name}_sum{_fmt_labels(self.labelnames, labels)} {_fmt_value(series[-1])}")
            out.append(f"{self.name}_count{_fmt_labels(self.labelnames, labels)} {_fmt_value(cumulative)}")
        return out


class Gauge:
    """Read at scrape time from `collect`, which returns {labels: value}."""

    def __init__(self, name: str, help: str, labelnames: Labels, collect: Callable[[], dict[Labels, float]]) -> None:
        self.name, self.help, self.labelnames, self._collect = name, help, labelnames, collect

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        out += [f"{self.name}{_fmt_labels(self.labelnames, k)} {_fmt_value(v)}" for k, v in self._collect().items()]
        return out


class GatewayMetrics:
    """Every series the gateway exports; also the lifecycle's Observer."""

    def __init__(self, running: Callable[[], dict[Labels, float]], waiting: Callable[[], dict[Labels, float]]) -> None:
        m = ("model",)
        self.ttft = Histogram("dormant:time_to_first_token_seconds", "Time to first token, seconds.", m, TTFT_BUCKETS)
        self.e2e = Histogram("dormant:e2e_request_latency_seconds", "End-to-end request latency, seconds.", m, LATENCY_BUCKETS)
        self.queue = Histogram("dormant:request_queue_time_seconds",
                               "Time a request was held before a replica admitted it, seconds.", m, LATENCY_BUCKETS)
        self.prompt_tokens = Counter("dormant:prompt_tokens_total", "Prefill tokens processed.", m)
        self.generation_tokens = Counter("dormant:generation_tokens_total", "Generation tokens produced.", m)
        self.running = Gauge("dormant:num_requests_running", "Requests admitted to a replica.", m, running)
        self.waiting = Gauge("dormant:num_requests_waiting", "Requests held (queued or waiting for a start).", m, waiting)
        self.cold_start = Histogram("dormant:cold_start_seconds", "Time from start to ready, seconds.", ("model", "tier"), START_BUCKETS)
        self.wake = Histogram("dormant:wake_seconds", "Time from wake to ready (tier asleep; suspended: resume and "
                              "wake), seconds.", ("model", "tier"), START_BUCKETS)
        self.checkpoint = Histogram("dormant:checkpoint_seconds", "The suspended tier's driver calls (op: suspend, "
                                    "resume), seconds.", ("model", "op"), START_BUCKETS)
        self.cold_start_phase = Histogram(
            "dormant:cold_start_phase_seconds",
            "Seconds per phase of a worker's start, as the worker measured it (path: cold or image).",
            ("model", "phase", "path"), PHASE_BUCKETS)
        self.transitions = Counter("dormant:state_transitions_total", "Replica state transitions.",
                                   ("model", "from_state", "to_state"))
        # issue 10: evictions the placer made, and what a switch costs a request
        self.evictions = Counter("dormant:evictions_total",
                                 "Replicas evicted by the placer (reason: make_room, host_budget, disk_budget, "
                                 "image_room; action: sleep, hibernate, delete_image).", ("model", "reason", "action"))
        self.switch_ttft = Histogram("dormant:time_to_first_token_by_tier_seconds",
                                     "Request to first token, by the state the model was in when the request came "
                                     "(ready, asleep, hibernated, cold...), seconds.", ("model", "tier"), TTFT_BUCKETS)
        self._all = (self.ttft, self.e2e, self.queue, self.prompt_tokens, self.generation_tokens, self.running,
                     self.waiting, self.cold_start, self.wake, self.cold_start_phase, self.transitions,
                     self.evictions, self.switch_ttft, self.checkpoint)

    # Observer
    def on_transition(self, model: str, from_state: State, to_state: State) -> None:
        self.transitions.inc((model, from_state.value, to_state.value))

    def on_ready(self, model: str, tier: str, seconds: float) -> None:
        (self.wake if tier in ("asleep", "suspended") else self.cold_start).observe((model, tier), seconds)

    def on_cold_start_phases(self, model: str, path: str, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.cold_start_phase.observe((model, phase, path), seconds)

    def on_eviction(self, model: str, reason: str, action: str) -> None:
        self.evictions.inc((model, reason, action))

    def on_checkpoint(self, model: str, op: str, seconds: float) -> None:
        self.checkpoint.observe((model, op), seconds)

    def observe_request(self, model: str, *, queue_s: float | None, ttft_s: float | None, e2e_s: float,
                        usage: dict | None, tier: str | None = None) -> None:
        if queue_s is not None:
            self.queue.observe((model,), queue_s)
        if ttft_s is not None:
            self.ttft.observe((model,), ttft_s)
            if tier is not None:
                self.switch_ttft.observe((model, tier), ttft_s)
        self.e2e.observe((model,), e2e_s)
        if usage:
            self.prompt_tokens.inc((model,), float(usage.get("prompt_tokens") or 0))
            self.generation_tokens.inc((model,), float(usage.get("completion_tokens") or 0))

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._all:
            lines += metric.render()
        return "\n".join(lines) + "\n"
