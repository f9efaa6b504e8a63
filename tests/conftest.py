import jax

# Four fake CPU devices for the sharding tests; fp32 matmuls for parity against PyTorch.
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "float32")
