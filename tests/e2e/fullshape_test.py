"""Every full config at its real shapes (ResNet-18 width 64, the full batches, image sizes, class counts and
stage graph) for a few steps: the `smoke` word, with tfds mock data where a data set is not prepared. The code
path is the one a GPU run takes. Hours on a 2-core CPU, so out of the default run: `python -m pytest -m fullshape`.
"""

import math
import os

import jax
import pytest
from helpers import run_experiment

from jaxpurify.poisoning.defaults import ATTACKS

pytestmark = pytest.mark.fullshape

CELLS = (["simclr:smoke", "moco:smoke", "byol:smoke", "drupe:smoke", "ctrl:smoke"]
         + [f"badencoder:{task},smoke" for task in ("stl10", "gtsrb", "svhn_cropped")]
         + [f"distill:attack={attack},downstream={task},smoke" for attack in ("badencoder", "drupe")
            for task in ("stl10", "gtsrb", "svhn_cropped")]
         + ["threat:threat=1,attack=badencoder,smoke"]
         + [f"threat:threat={threat},attack={attack},smoke" for threat in (2, 3) for attack in ATTACKS]
         + ["tcore:threat=1,attack=badencoder,smoke", "tcore:threat=2,attack=badnets,smoke",
            "tcore:threat=3,attack=badnets,smoke"]
         + [f"baseline:defense={defense},attack=badencoder,smoke"  # the encoder-side defenses
            for defense in ("nad", "mimic", "ssl_cleanse", "decree", "clp")])
# The mock pre-training set's 5% (250 images) is below SSL-Cleanse's mitigator batch of 1536 (CIFAR-10's 2,500 hold it)
OVERRIDES = {cell: ("baseline.ssl_cleanse.train.batch_size=128",) for cell in CELLS if cell.startswith("baseline:")}
# The field through which a config reads a finished pre-training run (as the configs' docstrings run them): these
# cells start from the SimCLR cell's encoder instead of pre-training their own (2 minutes a cell on 2 cores).
CLEAN_ENCODER = {"badencoder": "attack.clean_encoder", "drupe": "attack.clean_encoder",
                 "distill": "attack.clean_encoder", "baseline": "attack.clean_encoder",
                 "threat": "clean_encoder", "tcore": "clean_encoder"}


@pytest.fixture(scope="module", autouse=True)
def optimised_xla():
  """XLA's optimisations on, as in a real run (the test session turns most off for fast compiles): at full shapes the
  steps dominate, and unoptimised XLA:CPU compiles a convolution inside a loop (the Label-Consistent PGD's
  `fori_loop`) to a naive kernel, 100x slower (a width-64 PGD step at batch 16: 125 s against 0.9 s optimised)."""
  disabled = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", disabled)


@pytest.fixture(autouse=True)
def unprepared_data(tmp_path, monkeypatch):
  """No prepared data set anywhere: every split is served by mock data."""
  monkeypatch.setenv("JAXPURIFY_DATA_DIR", str(tmp_path / "no_data"))


@pytest.fixture(scope="module")
def simclr_smoke(tmp_path_factory) -> tuple[str, tuple[dict, str]]:
  """The SimCLR cell: (workdir, (evaluations, what it printed)) of `configs/simclr.py:smoke`."""
  workdir = str(tmp_path_factory.mktemp("simclr") / "run")
  return workdir, run_experiment("simclr:smoke", workdir)


@pytest.mark.parametrize("name_arg", CELLS)
def test_full_config_runs_end_to_end_at_a_few_steps(name_arg, tmp_path, request):
  if name_arg == "simclr:smoke":
    workdir, (evaluations, out) = request.getfixturevalue("simclr_smoke")
  else:
    workdir = str(tmp_path / "run")
    field = CLEAN_ENCODER.get(name_arg.split(":")[0])
    clean = (f"{field}={request.getfixturevalue('simclr_smoke')[0]}",) if field else ()
    evaluations, out = run_experiment(name_arg, workdir, *OVERRIDES.get(name_arg, ()), *clean)
  assert evaluations and "results:" in out
  for row, metrics in evaluations.items():
    for name, value in metrics.items():
      assert isinstance(value, float) and math.isfinite(value) and 0 <= value <= 1, (row, name, value)
  for stage in os.listdir(workdir):
    done = os.path.join(workdir, stage, "done.json")
    assert not os.path.isdir(os.path.join(workdir, stage)) or os.path.exists(done), f"{stage} did not finish"
