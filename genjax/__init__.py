"""genjax: classic generative models (GPT, Auto-Encoder, VAE, GAN) in pure-functional JAX/Flax.

``genjax.models`` holds one file per model family, ``genjax.data`` the data sets,
``genjax.train`` the training core shared by every experiment, ``genjax.tasks`` each
family's task (how its model, data and loss meet the core), ``genjax.metrics`` the
sample-quality metrics of image generators.
"""

__version__ = "0.1.0"

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # ``python -m genjax.launch`` or ``-m experiments.NAME`` starting
    from genjax import _interrupt

    _interrupt.install()
