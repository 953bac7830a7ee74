"""Plain-text score tables (kpnb.run.tables)."""
from kpnb.run.tables import score_table


def test_score_table_lines_up_each_row_and_marks_what_a_row_lacks():
    table = score_table({"a": {"x": 0.5, "y": 1}, "bb": {"x": None}}, ["x", "y"], corner="mode", name_width=6,
                        col_width=7)
    assert table.splitlines() == ["mode" + " " * 8 + "x      y", "a" + " " * 7 + "0.500  1.000",
                                 "bb" + " " * 8 + "nan    nan"]
