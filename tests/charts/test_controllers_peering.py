"""``matrixinfer-controllers --peering``: the chart's leader election (Kopf peering, one replica
reconciles, the highest priority; each replica picks a random one so they never tie)."""

from __future__ import annotations

from controllers.main import make_settings, parse_args


def test_default_is_standalone() -> None:
    config = parse_args([])
    assert config.peering is None
    assert make_settings(config).peering.standalone is True


def test_peering_flag_turns_peering_on_with_a_random_priority() -> None:
    first = parse_args(["--peering", "matrixinfer"])
    second = parse_args(["--peering", "matrixinfer"])
    assert first.peering == "matrixinfer"
    settings = make_settings(first)
    assert settings.peering.standalone is False
    assert settings.peering.priority == first.priority > 0
    # two replicas started alike do not tie (a tie would make both reconcile)
    assert first.priority != second.priority


def test_explicit_priority() -> None:
    config = parse_args(["--peering", "mi", "--priority", "7"])
    assert make_settings(config).peering.priority == 7
