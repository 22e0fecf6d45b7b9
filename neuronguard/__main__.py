"""`python -m neuronguard`: the CLI, as torchrun starts each rank of `serve --tensor-parallel-size`."""

import sys

from neuronguard.cli import main

sys.exit(main())
