"""qwen-deploy: a job queue for LLM work."""

__version__ = "0.1.0"
