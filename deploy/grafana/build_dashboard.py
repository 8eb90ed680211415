"""Generate deploy/grafana/dashboards/editserve.json from a short list of rows and panels.

Why generated: the panels stay readable here, and tests/test_deploy.py checks that every metric a
panel queries is one that service/metrics.py really exports.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "editserve.json"
P = "editserve_"


def q(quantile: float, metric: str, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({P}{metric}_bucket[5m])))"


ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Overview", [
        ("Requests/s by status", "reqps", [(f"sum by (code) (rate({P}http_requests_total[5m]))", "{{code}}")]),
        ("Edits completed/s", "ops", [(f"sum by (status) (rate({P}jobs_completed_total[5m]))", "{{status}}")]),
        ("Success ratio", "percentunit", [(
            f'sum(rate({P}jobs_completed_total{{status="succeeded"}}[15m])) / sum(rate({P}jobs_completed_total[15m]))',
            "succeeded")]),
        ("Jobs in progress", "short", [(f"sum({P}jobs_in_progress)", "running")]),
    ]),
    ("Queue", [
        ("Queue depth", "short", [(f"sum by (queue) ({P}queue_depth)", "{{queue}}")]),
        ("Queue wait p50/p95/p99", "s", [(q(0.5, "queue_wait_seconds"), "p50"), (q(0.95, "queue_wait_seconds"), "p95"),
                                          (q(0.99, "queue_wait_seconds"), "p99")]),
        ("Submitted/s by kind", "ops", [(f"sum by (kind) (rate({P}jobs_submitted_total[5m]))", "{{kind}}")]),
    ]),
    ("Batching", [
        ("Mean batch size", "short", [(f"sum(rate({P}batch_size_sum[5m])) / sum(rate({P}batch_size_count[5m]))",
                                        "mean")]),
        ("Batch size p50/p95", "short", [(q(0.5, "batch_size"), "p50"), (q(0.95, "batch_size"), "p95")]),
    ]),
    ("Inference", [
        ("Job duration p50/p95", "s", [(q(0.5, "job_duration_seconds"), "p50"),
                                        (q(0.95, "job_duration_seconds"), "p95")]),
        ("Seconds per denoising step p50/p95", "s", [(q(0.5, "denoise_step_seconds"), "p50"),
                                                      (q(0.95, "denoise_step_seconds"), "p95")]),
    ]),
    ("Errors and webhooks", [
        ("5xx and 429 per second", "reqps", [
            (f'sum(rate({P}http_requests_total{{code=~"5.."}}[5m]))', "5xx"),
            (f'sum(rate({P}http_requests_total{{code="429"}}[5m]))', "429")]),
        ("Failed edits/s", "ops", [(f'sum(rate({P}jobs_completed_total{{status="failed"}}[5m]))', "failed")]),
        ("Webhook deliveries/s by outcome", "ops", [
            (f"sum by (outcome) (rate({P}webhook_deliveries_total[5m]))", "{{outcome}}")]),
        ("Gateway latency p95 by route", "s", [(q(0.95, "http_request_duration_seconds", "route"), "{{route}}")]),
    ]),
]


def build() -> dict:
    panels, y, pid = [], 0, 1
    for title, row_panels in ROWS:
        panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        pid, y = pid + 1, y + 1
        width = 24 // len(row_panels)
        for i, (ptitle, unit, targets) in enumerate(row_panels):
            panels.append({
                "type": "timeseries", "title": ptitle, "id": pid,
                "datasource": {"type": "prometheus", "uid": "prometheus"},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "gridPos": {"h": 8, "w": width, "x": i * width, "y": y},
                "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(65 + k)}
                            for k, (expr, legend) in enumerate(targets)],
            })
            pid += 1
        y += 8
    return {"title": "editserve", "uid": "editserve", "schemaVersion": 39, "version": 1, "refresh": "30s",
            "time": {"from": "now-3h", "to": "now"}, "tags": ["editserve"], "panels": panels}


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
