"""jaxpurify's command line; all logic lives in `jaxpurify.cli` and the modules it dispatches to.

  python main.py --config configs/simclr.py:quick [--workdir runs/x] [--config.optim.lr=0.1]
"""

import sys

from jaxpurify import cli

if __name__ == "__main__":
  sys.exit(cli.main(sys.argv[1:]))
