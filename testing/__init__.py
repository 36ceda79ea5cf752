"""Helpers for the tests and benchmarks (not installed with the packages): local gloo worlds,
a private Slurm cluster, whole-state views of a ZeRO engine."""
