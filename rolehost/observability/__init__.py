"""Observability: the controller's event log and the console, instance logs,
Prometheus metrics, systemd's notify protocol."""
