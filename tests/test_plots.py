"""The report's score-against-delta figure: its second panel appears only with the share of changed outputs."""

from __future__ import annotations

import pytest
from matplotlib.image import imread

from pktjax.plots import plot_score_vs_delta

POINTS = [("LaTen lr 0.0003", 42, 1, 6.9e-4, 0.549), ("LaTen lr 0.0003", 42, 7, 9.2e-3, 0.555),
          ("LaTen lr 3e-05", 43, 7, 8.7e-5, 0.543)]


def test_changed_outputs_add_a_panel_below_the_scores(tmp_path):
    dpi = 50
    one = plot_score_vs_delta(POINTS, tmp_path / "one", {"base student": 0.543}, dpi=dpi)
    changed = [(*p, share) for p, share in zip(POINTS, (0.06, 0.55, None))]  # None: not known for that point
    two = plot_score_vs_delta(changed, tmp_path / "two", {"base student": 0.543}, dpi=dpi)
    assert [p.suffix for p in two] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in two)
    # the figure is 4.2 inches tall with one panel, 6.4 with two; its width stays 6.4
    assert imread(one[0]).shape[:2] == (round(4.2 * dpi), round(6.4 * dpi))
    assert imread(two[0]).shape[:2] == (round(6.4 * dpi), round(6.4 * dpi))


def test_a_point_without_a_positive_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="positive relative size"):
        plot_score_vs_delta([("LaTen", 1, 0, 0.0, 0.5)], tmp_path / "x")
    with pytest.raises(ValueError, match="at least one point"):
        plot_score_vs_delta([], tmp_path / "x")
    assert not list(tmp_path.iterdir())
