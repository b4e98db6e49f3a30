"""PyTorch twins of genjax's models, for the side-by-side benchmark
(``experiments.benchmark_pytorch``) and the parity tests (``tests/test_torch_twins.py``).

They need the optional ``torch`` extra (``pip install -e '.[torch]'``); the library
(``genjax/``) never imports torch. Each family's module gives:

- the model as its reference writes it (the lecture's GPT with a Python list of ``Head``
  modules; the image models as plain ``nn.Module`` s in NCHW);
- for the GPT, the same maths as a PyTorch expert writes it for speed (one fused q/k/v
  projection, ``scaled_dot_product_attention(is_causal=True)``); for the image models the
  expert's CPU/GPU choice is the ``channels_last`` memory format of the same modules;
- ``load_genjax(model, params)``: genjax's parameters (and BatchNorm statistics) copied into
  the twin, so that both compute the same function;
- ``make_optimizer(model, train)``: ``torch.optim`` as genjax's ``TrainConfig`` asks.
"""
