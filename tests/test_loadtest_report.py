"""summary.txt: with the CSV rows, every p99 names the answers behind it and a thin one is flagged."""

from __future__ import annotations

from loadtest_rows import synthetic_rows

from service.loadtest.evaluate import summarize_configs
from service.loadtest.report import MIN_P99_SAMPLES, summary_text


def _line(text: str, config: str) -> str:
    return next(ln for ln in text.splitlines() if ln[2:].startswith(config + " "))


def test_p99_cells_carry_their_sample_count_and_flag_thin_ones() -> None:
    rows = synthetic_rows(rates=(5.0, 20.0), seconds=10.0)  # 50 answers at 5/s, 200 at 20/s
    text = summary_text(summarize_configs(rows, 0.01), (5.0, 20.0), ["header"], rows=rows)
    line = _line(text, "cnn-s25/4/200 > dense/10")
    assert "~35.0 (50)" in line and "56.0 (200)" in line and "~56.0" not in line
    assert f"fewer than {MIN_P99_SAMPLES} answers" in text
    masked = _line(text, "cnn-m10/2/200 > dense/10").split()
    assert masked[4:6] == ["0.400", "2.900"]  # nonzero and dense-kernel MFLOPs side by side


def test_no_thin_flag_when_every_p99_has_enough_answers() -> None:
    rows = synthetic_rows(rates=(20.0,), seconds=10.0)
    text = summary_text(summarize_configs(rows, 0.01), (20.0,), ["header"], rows=rows)
    assert "~" not in text and "(200)" in text


def test_without_rows_the_table_keeps_its_old_columns() -> None:
    rows = synthetic_rows()
    text = summary_text(summarize_configs(rows, 0.01), (5.0, 20.0), ["header"])
    assert "(n)" not in text and "kernel" not in text and "p99@5" in text
