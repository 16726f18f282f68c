import atexit
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow],
                          print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# the suite is many tiny tensors: one thread avoids thread-pool overhead and oversubscription
torch.set_num_threads(1)

# `rewriter explain` caches model sites; the suite never reads or writes the user's cache
os.environ["REWRITER_CACHE_DIR"] = tempfile.mkdtemp(prefix="rewriter-test-cache-")
atexit.register(shutil.rmtree, os.environ["REWRITER_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def traced_models():
    """Whole-model traces, built once per session and cloned per use (``traced(name)``)."""
    from rewriter.models import load_model
    from rewriter.core.tracing import trace_model

    cache = {}

    def get(name: str, dtype=None):
        key = (name, dtype)
        if key not in cache:
            cache[key] = trace_model(load_model(f"builtin:{name}", dtype=dtype))
        return cache[key].clone()

    return get
