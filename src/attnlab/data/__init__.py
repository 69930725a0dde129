"""Datasets for attnlab: seeded synthetic Long-Range-Arena-style tasks, no download."""

from attnlab.data.synthetic import *  # noqa: F403  (the public names, listed once there)
from attnlab.data.synthetic import __all__  # noqa: F401
