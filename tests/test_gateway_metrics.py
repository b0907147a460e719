"""The gateway's lock-free histograms expose exactly what prometheus_client's own would for the same
observations (their text is what Prometheus and dashboards read)."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from shoal.gateway.metrics import LoopHistogram


def _series(text: bytes) -> list[str]:
    """The sample lines, without the ``_created`` series only prometheus_client's own writes."""
    return sorted(line for line in text.decode().splitlines() if line and "_created" not in line)


def test_loop_histograms_expose_what_prometheus_clients_do():
    buckets = (0.0005, 0.001, 0.01, 0.5, 10.0)
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    h = Histogram("x_seconds", "help text", ["model"], buckets=buckets, registry=theirs)
    mine = LoopHistogram("x_seconds", "help text", "model", buckets)
    ours.register(mine)
    values = [0.0, 0.0005, 0.00051, 0.001, 0.0099, 0.01, 0.3, 0.5, 9.99, 10.0, 10.01, 1e9]
    for model in ("a", "b/c"):
        for v in values:
            h.labels(model).observe(v)
            mine.labels(model).observe(v)
    assert _series(generate_latest(ours)) == _series(generate_latest(theirs))
