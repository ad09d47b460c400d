"""The one exception the conversion package raises on purpose."""

from __future__ import annotations


class ConversionError(Exception):
    """A checkpoint that cannot be exported; ``message`` is meant for the user as is."""

    def __init__(self, message: str, code: str = "conversion_failed") -> None:
        super().__init__(message, code)  # all arguments: survives pickling and Celery's JSON
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message
