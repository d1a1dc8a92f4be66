#!/usr/bin/env bash
# Sets up .venv-e2e-reference for tests/models/test_e2e_parity.py: the TTT-E2E authors' dependencies
# at their lock's versions (JAX on the CPU, from PyPI) beside .venv's packages (torch, transformers,
# ttt-mixer), which it reads through a .pth file. Their code itself is not on PyPI: check it out
# (github test-time-training/e2e) and name the checkout in TTT_E2E_REPO, then
#   TTT_E2E_REPO=/path/to/e2e .venv-e2e-reference/bin/python -m pytest tests/models/test_e2e_parity.py -s
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || bash scripts/setup.sh
venv=.venv-e2e-reference
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    jax==0.5.3 jaxlib==0.5.3 equinox==0.12.1 optax==0.2.4 orbax-checkpoint==0.11.13 einops==0.8.1 \
    jaxtyping==0.3.1 hydra-core==1.3.2 chex grain==0.2.7 tensorstore==0.1.73 numpy==2.2.5 typing_extensions
base=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$base')" > "$site/zz_ttt_mixer_venv.pth"
"$venv/bin/python" -c "import jax, equinox, orbax.checkpoint, torch, ttt_mixer.e2e; print('ready:', jax.__version__, torch.__version__)"
