"""Training runtime: engine, sharding, precision, optimizers, schedulers, data, checkpoints."""

import flexspeed._torch_check  # noqa: F401  (refuse a torch older than flexspeed supports)
