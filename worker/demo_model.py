"""The demo model builder, under its historical name (the recipe lives in ``worker.builders.demo``)."""

from worker.builders.demo import (  # noqa: F401
    DEMO_MODEL_VERSION,
    build_demo_model,
    default_cache_dir,
    demo_model_dir,
    zen_prompts,
    zen_text,
)
