"""shoal: elastic, distributed AI compute for edge devices."""

import os as _os

# No telemetry leaves a shoal process: set before any library that has it is imported.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
_os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # Flower also asks flower.ai for new versions
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

__version__ = "0.1.0"
