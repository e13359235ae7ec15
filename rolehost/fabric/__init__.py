"""The fabric: one instance's lifecycle and its adapter, and the controller with its
operations (walks, deploys, changes, the package store, the history)."""
