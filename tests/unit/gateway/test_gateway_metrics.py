"""The Prometheus text the gateway writes."""

from __future__ import annotations

import pytest

from dormant.gateway.metrics import Counter, GatewayMetrics, Histogram
from dormant.lifecycle.states import State


@pytest.mark.timeout(10)
def test_histogram_is_cumulative_with_sum_and_count():
    h = Histogram("dormant:x_seconds", "x", ("model",), (0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 5.0):
        h.observe(("m",), v)
    lines = h.render()
    assert 'dormant:x_seconds_bucket{model="m",le="0.1"} 2.0' in lines
    assert 'dormant:x_seconds_bucket{model="m",le="1.0"} 3.0' in lines
    assert 'dormant:x_seconds_bucket{model="m",le="+Inf"} 4.0' in lines
    assert 'dormant:x_seconds_count{model="m"} 4.0' in lines
    assert 'dormant:x_seconds_sum{model="m"} 5.65' in lines


@pytest.mark.timeout(10)
def test_labels_are_escaped():
    c = Counter("dormant:c_total", "c", ("model",))
    c.inc(('a"b\\c',))
    assert 'dormant:c_total{model="a\\"b\\\\c"} 1.0' in c.render()


@pytest.mark.timeout(10)
def test_observer_counts_transitions_and_tiers():
    m = GatewayMetrics(running=lambda: {("m",): 2.0}, waiting=lambda: {})
    m.on_transition("m", State.COLD, State.STARTING)
    m.on_ready("m", "cold", 3.0)
    m.on_ready("m", "asleep", 0.2)
    m.observe_request("m", queue_s=0.1, ttft_s=0.2, e2e_s=0.5, usage={"prompt_tokens": 7, "completion_tokens": 3})
    text = m.render()
    assert 'dormant:state_transitions_total{model="m",from_state="cold",to_state="starting"} 1.0' in text
    assert 'dormant:cold_start_seconds_count{model="m",tier="cold"} 1.0' in text
    assert 'dormant:wake_seconds_count{model="m",tier="asleep"} 1.0' in text
    assert 'dormant:prompt_tokens_total{model="m"} 7.0' in text
    assert 'dormant:generation_tokens_total{model="m"} 3.0' in text
    assert 'dormant:num_requests_running{model="m"} 2.0' in text


@pytest.mark.timeout(30)
def test_a_plain_answers_first_token_time_comes_from_the_worker():
    import httpx

    from dormant.gateway.proxy import plain_ttft
    from dormant.protocol import FIRST_TOKEN_HEADER

    def answer(headers):
        return httpx.Response(200, headers=headers, json={})

    assert plain_ttft(answer({FIRST_TOKEN_HEADER: "0.250000"}), waited=1.5) == pytest.approx(1.75)
    assert plain_ttft(answer({}), waited=1.5) is None  # no figure rather than the whole answer's time
    assert plain_ttft(answer({FIRST_TOKEN_HEADER: "soon"}), waited=1.5) is None
    assert plain_ttft(answer({FIRST_TOKEN_HEADER: "-1"}), waited=1.5) is None
