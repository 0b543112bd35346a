"""Self-supervised pre-training methods by name (config.pretrain.method).

Each module provides `build_model(config) -> nnx.Module` (with a `.backbone`), `init_extra(config, state)
-> dict` (the state the step updates without gradients, `TrainState.extra`) and
`make_step(graphdef, tx, config) -> step(state, batch, key) -> (state, metrics)`.
"""

from jaxpurify.ssl import byol, moco, simclr

METHODS = {"simclr": simclr, "moco": moco, "byol": byol}
