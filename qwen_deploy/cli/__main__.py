"""`python -m qwen_deploy.cli`."""

import sys

from qwen_deploy.cli import main

sys.exit(main())
