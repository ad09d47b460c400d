"""Bulk analysis: subclass Analyzer, run it in-process or through the queue (`qwen-deploy analyze`)."""

from analysis.base import Analyzer, LocalRunner, QueueRunner, run_analysis

__all__ = ["Analyzer", "LocalRunner", "QueueRunner", "run_analysis"]
