"""`python -m difflab ...` (and `torchrun ... -m difflab train ...`) runs the `difflab` command."""

from .cli import main
from .training.distributed import leave

leave(main())
