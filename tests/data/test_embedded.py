import io
import json
import os
import tokenize
from pathlib import Path

import pytest

from phi3_lightning.data import embedded
from phi3_lightning.data.embedded import (
    available_packages,
    build_code_classification,
    build_lm_corpus,
    build_token_types,
    default_cache_dir,
    embedded_splits,
    load_embedded,
    stdlib_dir,
    stdlib_files,
    token_type_names,
)


def test_stdlib_files_are_sorted_and_exclude_tests():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert "json/decoder.py" in files
    assert not any(f.startswith("test/") or "/test/" in f or "/tests/" in f for f in files)
    assert not any("site-packages" in f or "__pycache__" in f or f.startswith("_sysconfigdata") for f in files)
    assert all((stdlib_dir() / f).is_file() for f in files[:20])


def test_available_packages_and_token_types():
    pkgs = available_packages()
    assert {"json", "email", "asyncio"} <= set(pkgs)
    assert available_packages(["json", "no_such_pkg"]) == ["json"]
    names = token_type_names()
    assert names[:7] == ["NAME", "OP", "STRING", "NUMBER", "COMMENT", "NEWLINE", "NL"]


def test_lm_corpus_is_deterministic_hash_ordered():
    a = build_lm_corpus(max_files=6, progress=False)
    b = build_lm_corpus(max_files=6, progress=False)
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) == 6
    assert all(r["text"] == (stdlib_dir() / r["path"]).read_text(encoding="utf-8") for r in a)
    assert len(build_lm_corpus(max_files=6, max_documents=2, progress=False)) == 2


def test_code_classification_snippets():
    recs = build_code_classification(["json", "http"], snippet_lines=6, max_per_class=20, progress=False)
    labels = [r["label"] for r in recs]
    assert set(labels) == {"json", "http"} and labels.count("json") == 20
    for r in recs:
        assert r["path"].startswith(r["label"] + "/")
        assert len(r["text"].split("\n")) <= 6
    with pytest.raises(ValueError, match="none of the packages"):
        build_code_classification(["nope_pkg"], progress=False)


def test_token_types_match_python_tokenize():
    recs = build_token_types(max_files=2, lines_per_example=3, max_examples=50, progress=False)
    assert 0 < len(recs) <= 50
    allowed = set(token_type_names())
    for r in recs:
        assert len(r["words"]) == len(r["labels"]) > 0
        assert set(r["labels"]) <= allowed
        assert all(w for w in r["words"])
    # the first example's tokens are exactly the first tokens of its file, in order
    first = recs[0]
    src = (stdlib_dir() / first["path"]).read_text(encoding="utf-8")
    toks = [
        (t.string, tokenize.tok_name[t.type])
        for t in tokenize.generate_tokens(io.StringIO(src).readline)
        if tokenize.tok_name[t.type] in allowed and t.string
    ]
    # blank lines (an NL right after a line end) are not part of any example
    kept = [t for i, t in enumerate(toks) if not (t[1] == "NL" and (i == 0 or toks[i - 1][1] in ("NL", "NEWLINE")))]
    got = list(zip(first["words"], first["labels"]))
    assert kept[: len(got)] == got


def test_cache_is_written_atomically_and_reused(tmp_path, monkeypatch):
    recs = load_embedded("lm", cache_dir=tmp_path, progress=False, max_files=3)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json" and "embedded-lm-py" in files[0].name  # no temp left
    payload = json.loads(files[0].read_text())
    assert payload["kind"] == "lm" and len(payload["records"]) == 3

    def boom(**kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setitem(embedded._BUILDERS, "lm", boom)
    again = load_embedded("lm", cache_dir=tmp_path, progress=False, max_files=3)
    assert [dict(r) for r in again] == [dict(r) for r in recs]
    with pytest.raises(AssertionError):  # other parameters: another cache entry
        load_embedded("lm", cache_dir=tmp_path, progress=False, max_files=4)


def test_corrupt_cache_is_rebuilt(tmp_path):
    load_embedded("lm", cache_dir=tmp_path, progress=False, max_files=2)
    (path,) = tmp_path.iterdir()
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        recs = load_embedded("lm", cache_dir=tmp_path, progress=False, max_files=2)
    assert len(recs) == 2 and json.loads(path.read_text())["records"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PHI3_LIGHTNING_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PHI3_LIGHTNING_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "phi3_lightning"


def test_splits_by_file_path(cache_dir):
    parts = embedded_splits("lm", 0.2, 0.2, seed=0, cache_dir=cache_dir, progress=False, max_files=30)
    paths = {s: {r["path"] for r in v} for s, v in parts.items()}
    assert not (paths["train"] & paths["val"]) and not (paths["train"] & paths["test"])
    assert sum(len(v) for v in parts.values()) == 30
    again = embedded_splits("lm", 0.2, 0.2, seed=0, cache_dir=cache_dir, progress=False, max_files=30)
    assert {s: [r["path"] for r in v] for s, v in again.items()} == {
        s: [r["path"] for r in v] for s, v in parts.items()
    }
    no_test = embedded_splits("lm", 0.2, 0.0, cache_dir=cache_dir, progress=False, max_files=30)
    assert no_test["test"] is no_test["val"]


def test_unknown_kind():
    with pytest.raises(ValueError, match="embedded dataset 'images' is unknown"):
        load_embedded("images", cache_dir=os.devnull)
