"""The master process: binds, forks, supervises, handles signals, owns shared memory."""
