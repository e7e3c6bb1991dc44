"""Many adapters over one frozen base: adapter sets and mixed batches, weighted combinations,
and sweeps trained at once."""
