"""The bottom layer: helpers every other layer may use (process group, device, seeding, run
directory, checkpoint files, caches, versions). Nothing here imports another onestep package
except ``onestep.registry`` (for ``ConfigError``)."""
