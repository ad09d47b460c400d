"""Random-weight models, under their historical name (the builder lives in ``worker.builders.random``)."""

from worker.builders.random import SIZES, Shape, build_random_model, build_random_qwen2  # noqa: F401
