"""genjax: classic generative models (GPT, Auto-Encoder, VAE) in pure-functional JAX/Flax.

``genjax.models`` holds one file per model family, ``genjax.data`` the data sets,
``genjax.train`` the training core shared by every experiment.
"""

__version__ = "0.1.0"
