"""The exceptions the conversion package raises on purpose: one root, ``ConversionError``, with a ``code``."""

from __future__ import annotations


class ConversionError(Exception):
    """A download or export that cannot be done; ``message`` is meant for the user as is, ``code`` names why."""

    def __init__(self, message: str, code: str = "conversion_failed") -> None:
        super().__init__(message, code)  # all arguments: survives pickling and Celery's JSON
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message


class DownloadError(ConversionError):
    """A download that failed; ``permanent`` says whether retrying later can help."""

    def __init__(self, message: str, code: str, permanent: bool) -> None:
        Exception.__init__(self, message, code, permanent)  # all arguments: survives pickling
        self.message = message
        self.code = code
        self.permanent = permanent
