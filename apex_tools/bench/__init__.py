"""Benchmarks: each prints a table, writes JSON and compares with an anchor measured in the same run."""
