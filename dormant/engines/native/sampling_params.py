from dormant.engines.base import SamplingParams  # noqa: F401  - moved to the engine protocol
