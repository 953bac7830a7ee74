"""Plain-text tables of scores, as the notebooks print them."""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def score_table(rows: Mapping[str, Mapping[str, Any]], cols: Sequence[str], corner: str = "", name_width: int = 18,
                col_width: int = 14, digits: int = 3) -> str:
    """One line per named row of scores, one column per key of ``cols`` (NaN where a row lacks it), under a header
    line that starts with ``corner``."""
    lines = [f"{corner:{name_width}}" + "".join(f"{c:>{col_width}}" for c in cols)]
    for name, row in rows.items():
        lines.append(f"{name:{name_width}}"
                     + "".join(f"{_number(row.get(c)):>{col_width}.{digits}f}" for c in cols))
    return "\n".join(lines)


def _number(v: Any) -> float:
    return float("nan") if v is None else float(v)
