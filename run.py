"""Train or evaluate with KPO: `python run.py [--config FILE.yaml] [key=value ...]` (see README)."""

import sys

from kpo_lightning.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
