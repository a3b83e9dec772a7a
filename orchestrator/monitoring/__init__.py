"""Metric definitions, per-rank meters, job telemetry and health, the exporter, dashboards."""
