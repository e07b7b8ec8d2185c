import contextlib
import io

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


def test_efficiency_report_matches_a_hand_count():
    # lengths 3, 5, 1, 8 cut at 4 -> pieces 3 | 4, 1 | 1 | 4, 4: 17 tokens in 6 pieces. One batch holds them all
    # (batch 8), so both padded columns pad 6 pieces to 4: 24 slots. Best fit: [4] [4] [4] [3, 1] [1] = 5 rows of 4;
    # sequential (next fit, in document order 3, 4, 1, 1, 4, 4): [3] [4] [1, 1] [4] [4] = 5 rows.
    r = efficiency_report([3, 5, 1, 8], max_length=4, batch_size=8)
    assert r["tokens"] == 17 and r["examples"] == 6
    assert r["padding"] == pytest.approx(17 / 24) and r["grouped"] == pytest.approx(17 / 24)
    assert r["packed"] == pytest.approx(17 / 20) and r["packed_seq"] == pytest.approx(17 / 20)
    # padded rows rounded up to a multiple of 3: 4 -> 6 slots per piece
    r = efficiency_report([3, 5, 1, 8], max_length=4, batch_size=8, pad_to_multiple_of=3)
    assert r["padding"] == pytest.approx(17 / 36) and r["grouped"] == pytest.approx(17 / 36)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_length=0), "max_length=0"),
        (dict(max_length=-5), "max_length=-5"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(pad_to_multiple_of=0), "pad_to_multiple_of=0"),
        (dict(pad_to_multiple_of=-8), "pad_to_multiple_of=-8"),  # was a padding share above 100%
    ],
)
def test_efficiency_report_refuses_non_positive_sizes(kwargs, name):
    with pytest.raises(ValueError, match=name):
        efficiency_report([3, 5, 1, 8], **{"max_length": 4, "batch_size": 2, **kwargs})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corpus", "nope"], "invalid choice: 'nope'"),  # was a KeyError traceback
        (["--batch-size", "0"], "--batch-size 0"),  # was "range() arg 3 must not be zero"
        (["--max-length", "256", "0"], "--max-length 0"),  # same
        (["--max-length", "-5"], "--max-length -5"),  # was "got no tokens (all lengths are 0)"
        (["--pad-to-multiple-of", "-8"], "--pad-to-multiple-of -8"),  # was a 100.9% padding share
        (["--pad-to-multiple-of", "0"], "--pad-to-multiple-of 0"),  # was silently no rounding
    ],
)
def test_report_cli_refuses_bad_values_before_reading_a_corpus(args, message, monkeypatch):
    from phi3_lightning.cli import main as cli_main
    from phi3_lightning.data import report

    def never(*a, **k):
        raise AssertionError("the corpus was read before the arguments were checked")

    monkeypatch.setattr(report, "corpus_lengths", never)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main(["data-report", *args])
    assert rc == 2 and message in err.getvalue(), err.getvalue()
    assert "Traceback" not in err.getvalue()
