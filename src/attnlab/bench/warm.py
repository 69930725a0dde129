"""Preloaded by the runner's forkserver: pay the measurement's lazy imports once there
rather than in every child (importing :mod:`attnlab.bench.measure` alone does not)."""

from attnlab.bench.measure import warm_up

warm_up()
