"""Generate deploy/grafana/dashboards/editserve.json from a short list of rows and panels.

Why generated: the panels stay readable here, and tests/test_deploy_monitoring.py checks that every metric
and label a panel queries is one a running gateway, worker or webhook sender really exports (the GPU row
reads NVIDIA's DCGM exporter, which runs beside the workers in compose and Kubernetes).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "editserve.json"
P = "editserve_"


def q(quantile: float, metric: str, by: str = "") -> str:
    group = f"le{', ' + by if by else ''}"
    return f"histogram_quantile({quantile}, sum by ({group}) (rate({P}{metric}_bucket[5m])))"


# Values read from Redis at scrape time (queue depth, running edits, live workers) are reported alike by every
# gateway replica: take the max across replicas, never the sum.
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Overview", [
        ("Requests/s by status", "reqps", [(f"sum by (code) (rate({P}http_requests_total[5m]))", "{{code}}")]),
        ("Edits completed/s by model", "ops", [
            (f"sum by (model, status) (rate({P}jobs_completed_total[5m]))", "{{model}} {{status}}")]),
        ("Success ratio by model", "percentunit", [(
            f'sum by (model) (rate({P}jobs_completed_total{{status="succeeded"}}[15m])) '
            f"/ sum by (model) (rate({P}jobs_completed_total[15m]))", "{{model}}")]),
        ("Jobs in progress", "short", [(f"sum({P}jobs_in_progress)", "running")]),
    ]),
    ("Queue", [
        ("Waiting edits by model and priority", "short", [
            (f"max by (model, priority) ({P}queue_depth)", "{{model}} {{priority}}"),
            (f"max({P}queued_edits)", "all queued (held included)")]),
        ("Queue wait p95 by model", "s", [(q(0.95, "queue_wait_seconds", "model"), "{{model}}")]),
        ("Queue wait p50/p99 (all)", "s", [(q(0.5, "queue_wait_seconds"), "p50"), (q(0.99, "queue_wait_seconds"), "p99")]),
        ("Submitted/s by model and kind", "ops", [
            (f"sum by (model, kind) (rate({P}jobs_submitted_total[5m]))", "{{model}} {{kind}}")]),
    ]),
    ("Workers and autoscaling", [
        ("Live workers by model", "short", [(f"max by (model) ({P}live_workers)", "{{model}}")]),
        ("Running edits by model", "short", [(f"max by (model) ({P}running_edits)", "{{model}}")]),
        ("Pending work per model (the KEDA trigger)", "short", [(
            f"sum by (model) (max by (model, priority) ({P}queue_depth)) + on (model) "
            f"max by (model) ({P}running_edits)", "{{model}}")]),
    ]),
    ("Batching", [
        ("Mean batch size by model", "short", [(
            f"sum by (model) (rate({P}batch_size_sum[5m])) / sum by (model) (rate({P}batch_size_count[5m]))",
            "{{model}}")]),
        ("Batch size p50/p95", "short", [(q(0.5, "batch_size"), "p50"), (q(0.95, "batch_size"), "p95")]),
    ]),
    ("Inference", [
        ("Job duration p95 by model and kind", "s", [
            (q(0.95, "job_duration_seconds", "model, kind"), "{{model}} {{kind}}")]),
        ("Seconds per denoising step p50/p95", "s", [(q(0.5, "denoise_step_seconds"), "p50"),
                                                      (q(0.95, "denoise_step_seconds"), "p95")]),
    ]),
    ("Errors", [
        ("5xx and 429 per second", "reqps", [
            (f'sum(rate({P}http_requests_total{{code=~"5.."}}[5m]))', "5xx"),
            (f'sum(rate({P}http_requests_total{{code="429"}}[5m]))', "429")]),
        ("Failed edits/s by model", "ops", [
            (f'sum by (model) (rate({P}jobs_completed_total{{status="failed"}}[5m]))', "{{model}}")]),
        ("Refusals/s by limit", "ops", [(f"sum by (reason) (rate({P}rejections_total[5m]))", "{{reason}}")]),
        ("Gateway latency p95 by route", "s", [(q(0.95, "http_request_duration_seconds", "route"), "{{route}}")]),
    ]),
    ("Webhooks", [
        ("Deliveries/s by outcome", "ops", [
            (f"sum by (outcome) (rate({P}webhook_deliveries_total[5m]))", "{{outcome}}")]),
        ("Failure ratio", "percentunit", [(
            f'sum(rate({P}webhook_deliveries_total{{outcome=~"failed|retrying"}}[15m])) '
            f"/ sum(rate({P}webhook_deliveries_total[15m]))", "failed or retrying")]),
    ]),
    ("Storage (S3)", [
        ("S3 calls/s by operation and outcome", "ops", [
            (f"sum by (operation, outcome) (rate({P}s3_operations_total[5m]))", "{{operation}} {{outcome}}")]),
        ("S3 error ratio", "percentunit", [(
            f'sum(rate({P}s3_operations_total{{outcome="error"}}[15m])) / sum(rate({P}s3_operations_total[15m]))',
            "errors")]),
    ]),
    ("GPU (DCGM exporter)", [
        ("GPU utilisation", "percent", [("avg by (Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL)", "{{Hostname}} gpu{{gpu}}")]),
        ("GPU memory used", "decmbytes", [("max by (Hostname, gpu) (DCGM_FI_DEV_FB_USED)", "{{Hostname}} gpu{{gpu}}")]),
        ("Power and temperature", "short", [
            ("max by (Hostname, gpu) (DCGM_FI_DEV_POWER_USAGE)", "{{Hostname}} gpu{{gpu}} W"),
            ("max by (Hostname, gpu) (DCGM_FI_DEV_GPU_TEMP)", "{{Hostname}} gpu{{gpu}} C")]),
        ("XID errors", "short", [("max by (Hostname, gpu) (DCGM_FI_DEV_XID_ERRORS)", "{{Hostname}} gpu{{gpu}}")]),
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
