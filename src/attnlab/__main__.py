"""``python -m attnlab ...``: the command line, as the ``attnlab`` script; also what
``torchrun --nproc-per-node P -m attnlab train ...`` runs in each process."""

import sys

from attnlab.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
