"""GPU kernels (Pallas, jax-triton), seen and installed as ``quarkmoe_jax.kernels`` (``quarkmoe_jax/kernels`` is a
relative link to this folder)."""
