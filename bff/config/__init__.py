"""bff.config is becoming a package; this commit only moves the module (split follows)."""

from bff.config.build import *  # noqa: F403
from bff.config.build import MAX_CONFIG_BYTES, SCHEMA  # noqa: F401
