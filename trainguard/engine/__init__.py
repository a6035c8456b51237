"""The engine: the loop, its events, the step, data order, precision and optimizer."""
