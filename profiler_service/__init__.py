"""Profiling runs and the fitted performance tables (filled in by the profiler issue)."""
