"""The hypothesis profiles of ``conftest.py``: ``HYPOTHESIS_PROFILE`` picks one (``ci`` by
default) and ``examples(k)`` keeps a test's share of it."""

from __future__ import annotations

import os

from hypothesis import settings

from .conftest import PROFILE_ENV
from .strategies import CI_EXAMPLES, examples


def test_the_profile_of_the_environment_is_loaded_without_a_deadline():
    profile = os.environ.get(PROFILE_ENV, "ci")
    assert settings.default == settings.get_profile(profile)
    assert settings.default.deadline is None
    assert settings.get_profile("ci").max_examples == CI_EXAMPLES
    assert settings.get_profile("dev").max_examples > CI_EXAMPLES


def test_examples_scale_with_the_profile():
    scale = settings.default.max_examples / CI_EXAMPLES
    assert examples(40).max_examples == round(40 * scale)
    assert examples(1).max_examples >= 1
