"""`lorax batch-run ARGS...` with the fake engine in place of lorax.inference.LLM (kill/resume tests).

    python tests/batch/fake_run.py INPUT -o OUT --model m --adapter reverse=x ...
FAKE_STEP_DELAY (seconds per engine step) slows the fake engine so that a test can kill it mid-run.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_engine import FakeLLM  # noqa: E402

import lorax.inference  # noqa: E402
from lorax.cli.main import main  # noqa: E402

# Set in the module dict: `lorax.inference.LLM` is otherwise a lazy module attribute (engine import).
lorax.inference.__dict__["LLM"] = functools.partial(FakeLLM, step_delay=float(os.environ.get("FAKE_STEP_DELAY", "0")))

if __name__ == "__main__":
    sys.exit(main(["batch-run", *sys.argv[1:]]))
