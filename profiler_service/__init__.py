"""profiler_service: profiling runs that ask the workers to time synthetic batches, and the fitted performance
tables, stored and served by hardware + model + dtype + version."""
