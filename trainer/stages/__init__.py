"""The trainer's stages, in the order they run. Each takes the run's context and adds to it."""
