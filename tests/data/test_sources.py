import builtins
import json
import sys

import pytest

from phi3_lightning.data.sources import load_source, read_records, resolve_splits, split_by_hash, stable_fraction


def test_read_jsonl_json_csv_tsv_txt(tmp_path, write_jsonl):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    recs = read_records(p)
    assert [dict(r) for r in recs] == [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}]
    assert recs[1].where == f"{p} line 2"

    (tmp_path / "b.json").write_text(json.dumps({"data": [{"text": "z"}]}))
    assert [dict(r) for r in read_records(tmp_path / "b.json")] == [{"text": "z"}]

    (tmp_path / "c.csv").write_text('text,label\n"a, b",1\nc,0\n')
    recs = read_records(tmp_path / "c.csv")
    assert [dict(r) for r in recs] == [{"text": "a, b", "label": "1"}, {"text": "c", "label": "0"}]
    assert recs[0].where.endswith("line 2")

    (tmp_path / "d.tsv").write_text("text\tlabel\nhello world\tA\n")
    assert dict(read_records(tmp_path / "d.tsv")[0]) == {"text": "hello world", "label": "A"}

    (tmp_path / "e.txt").write_text("first para\nstill first\n\n\nsecond\n")
    assert [r["text"] for r in read_records(tmp_path / "e.txt")] == ["first para\nstill first", "second"]
    assert [r["body"] for r in read_records(tmp_path / "e.txt", text_field="body", text_unit="line")] == [
        "first para",
        "still first",
        "second",
    ]
    assert len(read_records(tmp_path / "e.txt", text_unit="file")) == 1
    assert len(read_records(p, limit=1)) == 1


def test_malformed_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "bad" "x"}\n')
    with pytest.raises(ValueError) as e:
        read_records(p)
    msg = str(e.value)
    assert msg.startswith(f"{p} line 3: not valid JSON (")
    assert "fix or remove the line" in msg
    p.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object .* got a list"):
        read_records(p)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train_file '.*nope.jsonl' does not exist"):
        read_records(tmp_path / "nope.jsonl", what="train_file")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"'.*empty.jsonl' holds no records \(it is empty\); add data"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="unknown suffix '.xml'"):
        read_records(tmp_path / "x.xml")
    (tmp_path / "bad.csv").write_text("text,label\na,b,c\n")
    with pytest.raises(ValueError, match="line 2: more fields than the header"):
        read_records(tmp_path / "bad.csv")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    real_import = builtins.__import__

    def no_parquet(name, *args, **kwargs):
        if name.split(".")[0] in ("pyarrow", "pandas"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_parquet)
    with pytest.raises(ImportError, match="needs pyarrow .* pip install pyarrow"):
        read_records(p)


def test_parquet_roundtrip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "d.parquet")
    assert [dict(r) for r in read_records(tmp_path / "d.parquet")] == [
        {"text": "a", "label": 0},
        {"text": "b", "label": 1},
    ]


def test_datasets_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match=r"source 'hf:imdb' needs the optional `datasets` package"):
        load_source("hf:imdb")


def test_datasets_saved_dir(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]}),
            "validation": datasets.Dataset.from_dict({"text": ["d"], "label": [1]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    splits = load_source(str(tmp_path / "ds"))
    assert len(splits["train"]) == 3 and len(splits["val"]) == 1


def test_load_source_directory_and_overrides(tmp_path, write_jsonl):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"text": f"t{i}"} for i in range(5)])
    write_jsonl(d / "validation.jsonl", [{"text": "v"}])
    splits = load_source(str(d))
    assert len(splits["train"]) == 5 and len(splits["val"]) == 1 and "test" not in splits
    write_jsonl(tmp_path / "t.jsonl", [{"text": "only"}])
    assert len(load_source(str(d), test_file=str(tmp_path / "t.jsonl"))["test"]) == 1
    assert len(load_source("", train_file=str(tmp_path / "t.jsonl"))["train"]) == 1
    with pytest.raises(ValueError, match="not 'embedded', 'hf:<name>', nor an existing file"):
        load_source(str(tmp_path / "missing"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="has no train.\\* file"):
        load_source(str(tmp_path / "emptydir"))


def test_split_by_hash_is_deterministic_and_content_based():
    recs = [{"text": f"doc {i}"} for i in range(1000)]
    a = split_by_hash(recs, 0.1, 0.2, seed=0)
    b = split_by_hash(list(reversed(recs)), 0.1, 0.2, seed=0)
    assert {s: sorted(r["text"] for r in v) for s, v in a.items()} == {
        s: sorted(r["text"] for r in v) for s, v in b.items()
    }
    assert sum(len(v) for v in a.values()) == 1000
    assert 60 < len(a["val"]) < 140 and 150 < len(a["test"]) < 250
    c = split_by_hash(recs, 0.1, 0.2, seed=1)
    assert c["val"] != a["val"]
    dup = split_by_hash([{"text": "same"}] * 3 + recs[:50], 0.3, 0.0)
    assert sum(r == {"text": "same"} for r in dup["train"]) in (0, 3)
    assert stable_fraction("x", 0) == stable_fraction("x", 0) != stable_fraction("x", 1)


def test_split_tiny_dataset_still_gets_val_and_test():
    parts = split_by_hash([{"text": str(i)} for i in range(3)], 0.1, 0.1)
    assert len(parts["train"]) == 1 and len(parts["val"]) == 1 and len(parts["test"]) == 1


def test_split_fraction_errors():
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        split_by_hash([{}], 1.5)
    with pytest.raises(ValueError, match="leaves nothing for training"):
        split_by_hash([{}], 0.5, 0.5)


def test_resolve_splits():
    recs = [{"text": str(i)} for i in range(100)]
    out = resolve_splits({"train": recs}, 0.1, 0.0)
    assert out["test"] is out["val"] and len(out["train"]) + len(out["val"]) == 100
    out = resolve_splits({"train": recs, "val": recs[:2]}, 0.1, 0.1)
    assert out["val"] == recs[:2] and len(out["test"]) > 0


# ------------------------------------------------------------------------------------------------ audit: odd files
def test_a_utf8_bom_is_not_part_of_the_data(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "hi"}\n')
    (tmp_path / "a.json").write_bytes(bom + b'[{"text": "hi"}]')
    (tmp_path / "a.csv").write_bytes(bom + b"text,label\nhi,pos\n")
    (tmp_path / "a.tsv").write_bytes(bom + b"text\tlabel\nhi\tpos\n")
    (tmp_path / "a.txt").write_bytes(bom + b"hi\n\nthere\n")
    for suffix in ("jsonl", "json"):
        assert [dict(r) for r in read_records(tmp_path / f"a.{suffix}")] == [{"text": "hi"}]
    for suffix in ("csv", "tsv"):  # the header's first column is "text", not "\ufefftext"
        assert [dict(r) for r in read_records(tmp_path / f"a.{suffix}")] == [{"text": "hi", "label": "pos"}]
    assert [r["text"] for r in read_records(tmp_path / "a.txt")] == ["hi", "there"]


def test_a_csv_field_longer_than_the_csv_module_default_is_read(tmp_path):
    long_text = "x" * 300_000  # the csv module refuses fields over 131072 characters by default
    (tmp_path / "big.csv").write_text(f"text,label\n{long_text},a\n")
    assert read_records(tmp_path / "big.csv")[0]["text"] == long_text


def test_malformed_csv_names_file_and_line_instead_of_swallowing_the_rest(tmp_path):
    # an unterminated quote would (non-strict) make one record of the rest of the file
    (tmp_path / "q.csv").write_text('text,label\nok,a\n"abc,a\nz,b\n')
    with pytest.raises(ValueError, match=r"q.csv line \d+: malformed CSV \(unexpected end of data\)"):
        read_records(tmp_path / "q.csv")


def test_a_csv_row_with_fewer_fields_lacks_them_instead_of_holding_none(tmp_path):
    (tmp_path / "few.csv").write_text("text,label\nabc\nd,e\n")
    recs = read_records(tmp_path / "few.csv")
    assert [dict(r) for r in recs] == [{"text": "abc"}, {"text": "d", "label": "e"}]


def test_a_directory_with_two_files_for_one_split_is_refused(tmp_path, write_jsonl):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"text": "from jsonl"}])
    (d / "train.csv").write_text("text\nfrom csv\n")
    with pytest.raises(ValueError, match=r"2 train files.*train.csv.*train.jsonl"):
        load_source(str(d))
    (d / "train.csv").unlink()
    write_jsonl(d / "val.jsonl", [{"text": "v1"}])
    write_jsonl(d / "validation.jsonl", [{"text": "v2"}])
    with pytest.raises(ValueError, match=r"2 val files.*val.jsonl.*validation.jsonl"):
        load_source(str(d))


def test_split_fallback_moves_every_copy_of_a_duplicated_record():
    recs = [{"text": f"t{i}"} for i in range(3)]
    first = min(recs, key=lambda r: stable_fraction(json.dumps(r, sort_keys=True, ensure_ascii=False)))
    data = [*recs, dict(first), dict(first)]  # three copies of the record the fallback moves to val
    parts = split_by_hash(data, 0.01)
    assert parts["val"] == [first] * 3
    assert first not in parts["train"] and len(parts["train"]) == 2
    # only copies of one record: nothing can be moved without emptying train
    parts = split_by_hash([{"text": "same"}] * 4, 0.01)
    assert len(parts["train"]) == 4 and parts["val"] == []
