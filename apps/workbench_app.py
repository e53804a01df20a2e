"""The VLLM Workbench in the browser (`make run`): a launcher for `workbench.app`, which holds the app's layout and
callbacks so the package, its tests and benchmarks import it like any other module."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from workbench.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
