"""Offline tools around the daemon: evaluation, benchmarks, the demo, training, synthetic datasets.

Imports flow one way: tools → daemon, workers, sensors; nothing in those packages imports tools.
"""
