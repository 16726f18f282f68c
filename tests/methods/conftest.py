"""The method tests' shared helpers assert too: let pytest explain their failures like the tests' own."""
import pytest

pytest.register_assert_rewrite("shared")
