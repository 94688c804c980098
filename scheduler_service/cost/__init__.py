"""The scheduler's performance model: profiled tables (tables), the iteration shapes they are read at (shape), the
composition per execution mode (model), its online correction (online_fit), the analytic model of published
hardware (analytic), and loading the profiler's tables for a live worker (loader)."""
