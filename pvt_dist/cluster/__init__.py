"""Cluster-facing code: launcher-agnostic process-group setup, preemption signals, the submitit job."""
