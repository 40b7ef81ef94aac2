"""Known-answer verdicts on scenarios harder than the demo (``pipelines.scenarios``).

Each test trains a small model on generated digits-on-textures data with or without a
planted background shortcut and audits it on a held-out set whose backgrounds are
independent of the class, as ``benchmarks/bench_verdicts.py`` does at more seeds: the
planted classes must be bias-driven, no other class may be, and clean models PASS.
"""

import pytest

from benchmarks.bench_verdicts import audit_scenario

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [0, 1])
def test_a_rare_spurious_background_is_found(tmp_path, seed):
    # Twelve backgrounds: each planted texture is on one audit image in twelve.
    result = audit_scenario("rare_background", seed, False, tmp_path)
    assert set(result.bias_driven) == set(result.planted), result
    assert result.outcome == "FAIL"


@pytest.mark.parametrize("seed", [0, 1])
def test_the_same_network_trained_without_the_shortcut_passes(tmp_path, seed):
    result = audit_scenario("rare_background", seed, True, tmp_path)
    assert result.bias_driven == () and result.suspected == (), result
    assert result.outcome == "PASS"


def test_a_class_right_almost_only_with_its_shortcut_is_found(tmp_path):
    result = audit_scenario("shortcut_only", 0, False, tmp_path)
    assert set(result.bias_driven) == set(result.planted), result
    # The transplant test, whose sample does not depend on the class's accuracy, ran.
    assert result.forward_passes["transplant"] > 0


def test_thin_objects_on_a_clean_model_raise_no_alarm(tmp_path):
    result = audit_scenario("thin_objects", 0, True, tmp_path)
    assert result.bias_driven == () and result.suspected == (), result
    assert result.outcome == "PASS"
