"""Each model family's task: how its model, its data and its loss meet the training core.

One module per family (``gpt``, ``autoencoder``, ``vae``, ``gan``, ``classifier``), each
with a ``make_task`` giving the :class:`genjax.train.loop.Task` that
:func:`genjax.train.loop.fit` trains, and the family's evaluation reports and figures.
This layer joins ``genjax.models`` (which import neither ``genjax.train`` nor
``genjax.data``: a model takes arrays) with ``genjax.data`` and ``genjax.train``.
"""
