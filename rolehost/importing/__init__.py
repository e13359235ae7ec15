"""Imports of a service from another platform: `rolehost import KIND`."""
