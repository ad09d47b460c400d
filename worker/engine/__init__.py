"""The batching engine, split the way nano-vllm and vLLM v1 are: `sequence` (Seq, SeqStatus, Sampling),
`scheduler` (a lane per priority class: admission, budgets, the bulk interleave), `runner` (every model forward
and cache touch), `sampler` (token choice for the whole batch), `detok` (text, stop strings, stream deltas), and
`core.Engine`, the loop that ties them together."""

from worker.engine.core import Engine
from worker.engine.detok import stable_text
from worker.engine.sequence import Sampling, Seq, SeqStatus

__all__ = ["Engine", "Sampling", "Seq", "SeqStatus", "stable_text"]
