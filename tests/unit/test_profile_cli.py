"""`apex-serve profile` turns a stored profile into a summary table and one PNG per table."""

from pathlib import Path

from apex_tools.profile_cli import plot, summary

PROFILE = {"tables": {
    "t_lin": {"xs": [1, 8, 64], "ys": [1000.0, 2000.0, 9000.0]},
    "t_gatt": {"xs": [1, 4], "ys": [256, 1024], "zs": [[100.0, 300.0], [150.0, 400.0]]},
    "t_sync": {"xs": [0], "ys": [2500.0]},
}}


def test_summary_lists_every_table_with_its_point_count_and_range() -> None:
    lines = summary(PROFILE).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["t_lin", "t_gatt", "t_sync"]
    assert lines[1].split()[1:4] == ["3", "1,000", "9,000"] and lines[2].split()[1:4] == ["4", "100", "400"]


def test_plot_writes_one_png_per_table(tmp_path: Path) -> None:
    written = plot(PROFILE, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["t_gatt.png", "t_lin.png", "t_sync.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)
