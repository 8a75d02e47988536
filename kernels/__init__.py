"""GPU kernels (Pallas, jax-triton), installed as ``quarkmoe_jax.kernels``; empty until the fused-MoE issue."""
