"""The operator's /metrics endpoint against the real local control plane."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from tests.integration.support import Api, OperatorProcess, simulated_ftj, wait_for


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_after_a_finetunejob_succeeded(api: Api, ns: str, operator: OperatorProcess) -> None:
    api.apply(simulated_ftj("counted", ns, run_seconds=2))
    api.wait_state("FineTuneJob", ns, "counted", "Succeeded", timeout=90)

    def succeeded_counted() -> dict | None:
        samples = scrape(operator.metrics_url)
        return samples if samples.get(("kubetune_finetunejobs", (("state", "Succeeded"),)), 0) >= 1 else None

    samples = wait_for(succeeded_counted, 30, "the Succeeded job in kubetune_finetunejobs")
    reconciled = [v for (name, labels), v in samples.items() if name == "kubetune_reconcile_total"]
    ok = samples.get(("kubetune_reconcile_total", (("controller", "finetunejob"), ("result", "ok"))), 0)
    assert ok > 0 and sum(reconciled) >= ok
    assert samples[("kubetune_reconcile_duration_seconds_count", (("controller", "finetunejob"),))] > 0
    assert ("kubetune_modelservers_ready", ()) in samples
