import os
import shutil
import tempfile

# Unoptimised LLVM code generation for XLA:CPU (read when the backend starts, and inherited by the subprocesses the
# tests start): the suite compiles hundreds of programs of tiny models, and a program compiles 15-25 % faster
# while the tiny models run no slower that matters. Parity tolerances are unchanged.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Four fake CPU devices for the sharding tests; fp32 matmuls for parity against PyTorch.
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "float32")

# One persistent compilation cache per test run, made by the first process (the xdist controller) and inherited
# through the environment by its workers and by the CLI, notebook and jax.distributed subprocesses they start:
# many of them compile the same programs of the embedded model. A run starts with an empty cache and removes it.
_OWN_CACHE = "JAXDEBIAS_TEST_JIT_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["JAXDEBIAS_TEST_JIT_CACHE"] = tempfile.mkdtemp(prefix="jaxdebias-test-jit-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXDEBIAS_TEST_JIT_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAXDEBIAS_TEST_JIT_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny toy checkpoint directory (``tests.cli.samples.tiny_checkpoint``: 4 x 4 patches, 4 decoder layers),
    written once per test process, for tests that need a checkpoint but not the embedded default's behaviour."""
    from tests.cli.samples import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint") / "tiny")
