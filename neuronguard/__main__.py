"""`python -m neuronguard`: the CLI, as torchrun starts each rank (`serve --tensor-parallel-size`, `identify`)."""

from neuronguard.cli import main

code = main()
from neuronguard.models.distributed import exit_process  # noqa: E402 (imports torch only once a command ran)

exit_process(code)
