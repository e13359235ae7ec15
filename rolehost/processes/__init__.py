"""Child processes: spawning them, seeing them exit, sweeping their trees; who
limited work runs as."""
