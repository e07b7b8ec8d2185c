import pytest

from phi3_lightning.data import efficiency_report
from phi3_lightning.data.report import main


def test_efficiency_report_on_synthetic_lengths():
    lengths = [1, 63, 2, 62, 30, 34, 16, 48] * 10
    r = efficiency_report(lengths, max_length=64, batch_size=4, seed=0)
    assert r["packed"] == 1.0  # pairs sum to 64 exactly
    assert 0 < r["padding"] < r["grouped"] <= 1.0
    assert r["tokens"] == sum(lengths) and r["examples"] == len(lengths)
    # documents longer than max_length are cut into pieces in every column
    r = efficiency_report([100], max_length=64, batch_size=2)
    assert r["examples"] == 2 and r["padding"] == pytest.approx(100 / 128)
    with pytest.raises(ValueError, match="no tokens"):
        efficiency_report([0, 0])


def test_report_script_prints_a_table(cache_dir, capsys):
    main(["--corpus", "code_cls", "--max-length", "64", "256", "--batch-size", "8", "--cache-dir", cache_dir])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "padding" in lines[1] and "grouped" in lines[1] and "packed" in lines[1]
    assert len(lines) == 5 and lines[3].startswith("code_cls") and "%" in lines[3]
