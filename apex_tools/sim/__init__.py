"""The simulator (`apex-serve simulate`): the scheduler's real policies on a virtual clock, priced by a cost model."""
