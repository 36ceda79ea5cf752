"""``python -m pretrain ...`` is ``seqboat ...``."""

import sys

from pretrain.cli import main

if __name__ == "__main__":  # guard: dist_checkpointing's spawned savers re-import the entry
    sys.exit(main())
