"""The scaling policy on recorded load traces, driven through a small fluid simulation of a model's
workers: each worker computes one second of model time per second, a launched worker joins after a
start-up delay, work that finds no free worker waits in the queue."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from shoal.autoscale.policy import Decision, LoadSample, ScalePolicy, WorkerView, decide, workers_to_stop
from shoal.autoscale.traces import day_shape

SERVICE_S = 0.01  # model time per request: one worker serves 100 requests/s


@dataclass
class Run:
    workers: list[int] = field(default_factory=list)  # present (ready + starting) after each tick
    ready: list[int] = field(default_factory=list)
    queue: list[float] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    launched: int = 0
    events: int = 0

    @property
    def worker_seconds(self) -> float:
        return float(sum(self.ready))


def simulate(
    rates: list[float],
    policy: ScalePolicy,
    start_ticks: int = 1,
    ready0: int | None = None,
    never_ready: bool = False,
    lead_s: float = 0.0,
) -> Run:
    """One tick = one second. The controller samples, decides and acts once a tick."""
    ready = policy.min_workers if ready0 is None else ready0
    starting: list[int] = []  # ticks left for each starting worker
    queue_work = 0.0  # model seconds waiting
    samples: list[LoadSample] = []
    last_scale = -1e9
    run = Run()
    for t, rate in enumerate(rates):
        now = float(t)
        offered = rate * SERVICE_S + queue_work
        busy = min(offered, float(ready))
        queue_work = offered - busy
        samples.append(
            LoadSample(
                t=now,
                arrivals_per_s=rate,
                queue=math.ceil(queue_work / SERVICE_S),
                busy=busy,
                ready=ready,
                starting=len(starting),
                worker_capacity=1000,
                service_s=SERVICE_S,
            )
        )
        samples = samples[-600:]
        d = decide(samples, policy, now, last_scale, lead_s)
        run.decisions.append(d)
        present = ready + len(starting)
        if d.desired > present:
            starting += [start_ticks] * (d.desired - present)
            run.launched += d.desired - present
        elif d.desired < present:
            drop = present - d.desired
            cut = min(drop, len(starting))  # cancel starting ones first, then drain ready ones
            starting = starting[cut:]
            ready -= drop - cut
        if d.desired != present:
            last_scale = now
            run.events += 1
        if not never_ready:
            starting = [s - 1 for s in starting]
            ready += sum(1 for s in starting if s <= 0)
            starting = [s for s in starting if s > 0]
        run.workers.append(ready + len(starting))
        run.ready.append(ready)
        run.queue.append(queue_work / SERVICE_S)
    return run


POLICY = ScalePolicy(min_workers=1, max_workers=8, target_utilisation=0.7, scale_up_window_s=1.0,
                     scale_down_window_s=20.0, cooldown_s=10.0, max_step=2)


def test_a_step_is_followed_up_quickly_and_held():
    rates = [50.0] * 20 + [400.0] * 60  # 0.5 -> 4 workers of model time
    run = simulate(rates, POLICY)
    need = math.ceil(4.0 / 0.7)  # 6
    assert run.workers[19] == 1
    up = next(i for i, n in enumerate(run.workers) if n >= need)
    assert up - 20 <= 4  # two steps of two, a tick each, plus the first sample
    assert run.workers[-1] == need and max(run.workers) == need
    assert run.queue[-1] == 0  # the backlog of the step was served


def test_a_ramp_is_followed_without_lagging_more_than_a_step():
    rates = [10.0 * i for i in range(60)]  # up to 5.9 workers
    run = simulate(rates, POLICY)
    for i, r in enumerate(rates[2:], start=2):
        assert run.workers[i] >= math.ceil(r * SERVICE_S / 0.7) - 1


def test_a_spike_scales_up_then_back_down_after_the_window():
    rates = [50.0] * 10 + [600.0] + [50.0] * 60
    run = simulate(rates, POLICY)
    assert max(run.workers) > 1
    assert run.workers[-1] == 1
    back = next(i for i in range(11, len(run.workers)) if run.workers[i] == 1)
    assert back >= 10 + POLICY.scale_down_window_s  # not before the down window has passed


def test_a_day_shaped_curve_uses_far_fewer_worker_seconds_than_a_fleet_sized_for_the_peak():
    n = 600
    rates = [400.0 * day_shape(t / n) for t in range(n)]  # up to 4 workers of model time
    run = simulate(rates, POLICY)
    static = max(run.workers) * n
    assert run.worker_seconds <= 0.6 * static
    assert max(run.queue) < 200  # at most two seconds of the peak waiting at any time


def test_load_flapping_around_a_threshold_does_not_flap_the_fleet():
    # 0.7 and 0.72 workers of load: 1 and 2 workers wanted, alternating every second.
    rates = [70.0 if t % 2 else 72.0 for t in range(600)]
    run = simulate(rates, POLICY)
    assert run.events <= 2
    assert run.workers[-1] == 2


def test_a_worker_that_never_becomes_ready_does_not_make_it_ask_for_more():
    rates = [500.0] * 120
    run = simulate(rates, POLICY, ready0=1, never_ready=True)
    assert run.launched <= POLICY.max_workers
    assert max(run.workers) <= POLICY.max_workers


SLEEPY = ScalePolicy(min_workers=0, max_workers=4, scale_down_window_s=10.0, cooldown_s=5.0, idle_to_zero_s=30.0)


def test_a_model_at_zero_wakes_for_one_request_and_sleeps_again():
    rates = [0.0] * 40 + [1.0] + [0.0] * 60
    run = simulate(rates, SLEEPY, ready0=0)
    assert run.workers[39] == 0
    assert run.decisions[40].desired == 1 and run.decisions[40].reason.startswith("wake")
    assert run.workers[40] == 1
    asleep_again = next(i for i in range(41, len(run.workers)) if run.workers[i] == 0)
    assert 40 + SLEEPY.idle_to_zero_s <= asleep_again <= 40 + SLEEPY.idle_to_zero_s + 2
    assert run.queue[-1] == 0  # the request was served


def test_a_model_with_traffic_never_sleeps():
    rates = [1.0] * 200
    run = simulate(rates, SLEEPY, ready0=1)
    assert min(run.workers[1:]) == 1


@pytest.mark.parametrize(
    "policy, field_name",
    [
        (ScalePolicy(min_workers=3, max_workers=2), "min"),
        (ScalePolicy(scale_down_window_s=-1), "scale_down_window_s"),
        (ScalePolicy(target_utilisation=0), "target_utilisation"),
        (ScalePolicy(max_step=0), "max_step"),
        (ScalePolicy(min_workers=0), "min"),
        (ScalePolicy(min_workers=1, idle_to_zero_s=60), "idle_to_zero_s"),
    ],
)
def test_invalid_policies_name_the_field(policy, field_name):
    assert any(p.startswith(field_name + ":") for p in policy.problems())


def test_a_valid_policy_has_no_problems():
    assert POLICY.problems() == [] and SLEEPY.problems() == []


def test_scale_in_drains_the_least_loaded_newest_workers():
    ws = [WorkerView("a", 3, 10.0), WorkerView("b", 0, 5.0), WorkerView("c", 0, 20.0), WorkerView("d", 1, 1.0)]
    assert workers_to_stop(ws, 2) == ["c", "b"]
    assert workers_to_stop(ws, 0) == []


def test_a_rising_load_is_met_ahead_by_a_workers_start_up_time():
    """Workers that take three seconds to start: projecting the trend that far ahead keeps the queue
    of a ramp short, where reacting to the load as it is lets it grow."""

    def run(lead: float) -> Run:
        rates = [20.0 * t for t in range(40)] + [800.0] * 20  # up to 8 workers of model time
        policy = ScalePolicy(min_workers=1, max_workers=12, scale_up_window_s=1.0, scale_down_window_s=30,
                             cooldown_s=10, max_step=3)
        return simulate(rates, policy, start_ticks=3, lead_s=lead)

    reactive, ahead = run(0.0), run(3.0)
    assert max(ahead.queue) < 0.5 * max(reactive.queue)
    assert ahead.worker_seconds <= 1.2 * reactive.worker_seconds  # not by keeping a big fleet


def test_a_flat_load_that_wobbles_is_not_projected_and_does_not_flap():
    """One device at night: its load sits at half a worker and creeps up and down between samples.
    With the start-up lead on, the projection must not add a second worker that the next scale-down
    removes again."""
    from shoal.autoscale.policy import trend

    policy = ScalePolicy(min_workers=1, max_workers=4, target_utilisation=0.5, scale_up_window_s=0.5,
                         scale_down_window_s=1.0, cooldown_s=1.0)
    wobble = [0.40, 0.42, 0.45, 0.47, 0.50, 0.44, 0.46, 0.48, 0.50, 0.43, 0.45, 0.47, 0.49, 0.50] * 4
    samples = [LoadSample(t=0.25 * i, busy=b, ready=1) for i, b in enumerate(wobble)]
    for k in range(8, len(samples)):
        window = samples[: k + 1]
        assert trend(window[-8:]) == 0.0
        assert decide(window, policy, window[-1].t, -1e9, lead_s=0.8).desired == 1, k


def test_one_device_whose_request_is_in_flight_at_a_sample_is_not_a_trend():
    """One device at night, one request at a time: a sample that finds it in flight reads half a
    worker of slots, the next may not. The arriving work is flat; no projected second worker."""
    policy = ScalePolicy(min_workers=1, max_workers=4, target_utilisation=0.5, scale_up_window_s=0.5,
                         scale_down_window_s=1.0, cooldown_s=1.0)
    in_flight = [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    samples = [LoadSample(t=0.25 * i, arrivals_per_s=100.0, service_s=0.0005, cpu=0.2 + 0.002 * i,
                          in_flight=f, ready=1, worker_capacity=2) for i, f in enumerate(in_flight)]
    for k in range(4, len(samples)):
        window = samples[: k + 1]
        assert decide(window, policy, window[-1].t, -1e9, lead_s=0.8).desired == 1, k


def test_one_request_to_an_idle_model_is_not_a_trend():
    from shoal.autoscale.policy import trend

    blip = [LoadSample(t=0.25 * i, busy=b, ready=1) for i, b in enumerate([0.0, 0.0, 0.0, 0.5])]
    noisy = [LoadSample(t=0.25 * i, busy=b, ready=1) for i, b in enumerate([1.0, 1.4, 0.9, 1.5, 1.6])]
    ramp = [LoadSample(t=0.25 * i, busy=b, ready=1) for i, b in enumerate([1.0, 1.2, 1.4, 1.6, 1.8])]
    assert trend(blip) == 0.0 and trend(noisy) == 0.0
    assert trend(ramp) == pytest.approx(0.8)
    creep = [LoadSample(t=0.25 * i, busy=b, ready=1) for i, b in enumerate([1.0, 1.05, 1.1, 1.15, 1.2])]
    assert trend(creep) == 0.0  # a fifth of a worker: within what a flat load wobbles
    d = decide(blip, POLICY, 0.75, -1e9, lead_s=3.0)
    assert d.desired == 1  # 0.5 workers of load: one worker, whatever the lead
