"""dormant: a self-hosted, scale-to-zero OpenAI-compatible LLM server."""

__version__ = "0.1.0"
