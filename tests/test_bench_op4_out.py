"""bench.op4_out runs end to end on a small case and writes its table (the timings themselves are not tested)."""

from __future__ import annotations

import json

from bench import op4_out


def test_op4_out_bench_writes_its_rows(tmp_path, capsys):
    op4_out.main(["--sizes", "1", "--modalities", "2", "--rounds", "1", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("*-op4-out.json")
    (row,) = json.loads(result.read_text())["results"]
    assert row["M"] == 2 and row["D"] == 1 << 20 and set(row["ms"]) == {"allocating", "out=", "copy"}
    assert all(v > 0 for v in row["fraction_of_copy_speed"].values())
    assert "| 2 | 1M |" in capsys.readouterr().out
