"""synthtune's tests; shared helpers live in tests.support (fixtures in conftest.py)."""
