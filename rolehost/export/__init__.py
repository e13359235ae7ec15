"""Exports of a service to other process managers: `rolehost export KIND`."""
