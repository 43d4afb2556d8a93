"""shared/metrics.py without a bus: exemplars carry the job's trace id, the gauges a scrape
reads from live services, and no label that grows with the jobs."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, Histogram
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from shared import metrics
from shared.tracing import new_trace


def test_trace_id_is_the_second_field_of_a_traceparent() -> None:
    parent = new_trace()
    assert metrics.trace_id(parent) == parent.split("-")[1]
    assert metrics.trace_id("") == ""
    assert metrics.trace_id("00-short-abc-01") == ""


def test_a_job_latency_carries_its_trace_id_as_exemplar() -> None:
    parent = new_trace()
    metrics.observe(metrics.JOB_RUN, 0.02, parent)
    text = openmetrics(REGISTRY).decode()
    assert f'# {{trace_id="{metrics.trace_id(parent)}"}} 0.02' in text


def test_no_exemplar_without_a_trace_and_never_a_negative_time() -> None:
    histogram = Histogram("cumulus_test_phase_seconds", "test", registry=None)
    metrics.observe(histogram, -1.0, "")
    assert histogram.collect()[0].samples[-2].value == 0.0  # _sum


class _Service:
    def __init__(self, values: list[metrics.GaugeValue], fail: int = 0) -> None:
        self.values = values
        self.fail = fail

    def gauges(self) -> Iterable[metrics.GaugeValue]:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("dictionary changed size during iteration")
        return list(self.values)


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_gauges_are_read_from_live_services_at_scrape_time() -> None:
    scheduler = _Service(
        [
            ("cumulus_gpu_tenths_allocated", ("w-test", "0"), 3),
            ("cumulus_gpu_tenths_free", ("w-test", "0"), 7),
            ("cumulus_queue_length", (), 2),
        ],
        fail=1,  # a dict changed under the first read: read again
    )
    metrics.watch(scheduler)
    assert _sample("cumulus_gpu_tenths_allocated", worker="w-test", device="0") == 3
    assert _sample("cumulus_gpu_tenths_free", worker="w-test", device="0") == 7
    scheduler.values = [("cumulus_gpu_tenths_allocated", ("w-test", "0"), 5)]
    assert _sample("cumulus_gpu_tenths_allocated", worker="w-test", device="0") == 5
    del scheduler  # a service gone is no longer read
    assert _sample("cumulus_gpu_tenths_allocated", worker="w-test", device="0") is None


def test_no_metric_has_a_job_id_label() -> None:
    for family in REGISTRY.collect():
        for sample in family.samples:
            assert "job_id" not in sample.labels, sample.name
            assert "job" not in sample.labels, sample.name
