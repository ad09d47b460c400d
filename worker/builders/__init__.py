"""Locally built models (the demo model, random-weight models), cached under the cache root."""
