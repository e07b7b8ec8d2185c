import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, default_collate

from phi3_lightning.data.collate import PaddingCollator
from phi3_lightning.data.packing import pack_documents, packing_efficiency, plan_packing

PAD = 0


def _docs(lengths):
    """Documents whose tokens are all distinct (1, 2, 3, ...) so each can be traced."""
    docs, v = [], 1
    for n in lengths:
        docs.append(list(range(v, v + n)))
        v += n
    return docs


def test_docstring_picture():
    # A (3 tokens), B (2), C (2), one padding token: the exact row drawn in the packing docstring
    a, b, c = [11, 12, 13], [21, 22], [31, 32]
    rows = pack_documents([a, b, c], row_length=8, pad_token_id=PAD, strategy="sequential")
    assert len(rows) == 1
    assert rows.input_ids.tolist() == [[11, 12, 13, 21, 22, 31, 32, PAD]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 1, 0]]
    assert rows.labels.tolist() == [[-100, 12, 13, -100, 22, -100, 32, -100]]
    assert rows.efficiency == pytest.approx(7 / 8)


def test_best_fit_fills_rows():
    # 6+2 | 5+3 | 4+4 fit exactly with best-fit decreasing; sequential needs more rows
    lengths = [6, 5, 4, 4, 3, 2]
    rows = pack_documents(_docs(lengths), row_length=8, pad_token_id=PAD)
    assert len(rows) == 3 and rows.efficiency == 1.0
    assert len(pack_documents(_docs(lengths), 8, PAD, strategy="sequential")) == 4


def test_split_long_documents():
    rows = pack_documents(_docs([10]), row_length=4, pad_token_id=PAD, strategy="sequential")
    assert rows.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, PAD, PAD]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 1]]
    # every piece starts a (pseudo) document: its first label is -100
    assert rows.labels[:, 0].tolist() == [-100, -100, -100]


def test_split_long_off_is_an_error():
    with pytest.raises(ValueError) as e:
        pack_documents(_docs([3, 9]), row_length=8, pad_token_id=PAD, split_long=False)
    msg = str(e.value)
    assert "document 1 has 9 tokens" in msg and "row length 8" in msg
    assert "split_long=True" in msg and "max_length" in msg


def test_custom_labels_are_kept_except_document_starts():
    docs = [[1, 2, 3, 4], [5, 6, 7]]
    labels = [[-100, -100, 3, 4], [5, -100, 7]]
    rows = pack_documents(docs, 8, PAD, labels=labels, strategy="sequential")
    assert rows.labels.tolist() == [[-100, -100, 3, 4, -100, -100, 7, -100]]


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 label lists for 1 documents"):
        pack_documents([[1]], 4, PAD, labels=[[1], [2]])
    with pytest.raises(ValueError, match="document 0 has 2 tokens but 1 labels"):
        pack_documents([[1, 2]], 4, PAD, labels=[[1]])
    with pytest.raises(ValueError, match="nothing to pack"):
        pack_documents([[], []], 4, PAD)
    with pytest.raises(ValueError, match="row_length=0"):
        pack_documents([[1]], 0, PAD)
    with pytest.raises(ValueError, match="strategy 'first_fit' is unknown"):
        pack_documents([[1]], 4, PAD, strategy="first_fit")


def test_packed_rows_feed_a_dataloader():
    rows = pack_documents(_docs([5, 3, 7, 2, 6]), 8, PAD)
    for collate in (default_collate, PaddingCollator(PAD)):
        batch = next(iter(DataLoader(rows, batch_size=2, collate_fn=collate)))
        assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2, 8)
        assert batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["position_ids"], rows.position_ids[:2])


def test_packing_efficiency_matches_rows():
    lengths = [5, 3, 7, 2, 6, 13, 1]
    rows = pack_documents(_docs(lengths), 8, PAD)
    assert packing_efficiency(rows) == rows.efficiency == packing_efficiency(lengths, 8)
    assert rows.num_real_tokens == sum(lengths)
    with pytest.raises(ValueError, match="row_length"):
        packing_efficiency(lengths)


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=25).filter(lambda x: sum(x) > 0),
    row_length=st.integers(1, 32),
    strategy=st.sampled_from(["best_fit", "sequential"]),
    masked=st.booleans(),
)
def test_packing_properties(lengths, row_length, strategy, masked):
    docs = _docs(lengths)
    labels = [[t if t % 3 else -100 for t in d] for d in docs] if masked else None
    rows = pack_documents(docs, row_length, PAD, split_long=True, labels=labels, strategy=strategy)
    R, L = rows.input_ids.shape
    assert L == row_length  # no row exceeds its length
    for t in (rows.labels, rows.position_ids, rows.attention_mask):
        assert t.shape == (R, L)

    # every real token appears exactly once
    real = rows.input_ids[rows.attention_mask.bool()].tolist()
    assert sorted(real) == list(range(1, sum(lengths) + 1))
    assert (rows.input_ids[~rows.attention_mask.bool()] == PAD).all()

    origin = {t: (d, j) for d, doc in enumerate(docs) for j, t in enumerate(doc)}  # token -> (doc, index in doc)
    for r in range(R):
        ids, pos = rows.input_ids[r].tolist(), rows.position_ids[r].tolist()
        lab, mask = rows.labels[r].tolist(), rows.attention_mask[r].tolist()
        n_real = sum(mask)
        assert mask == [1] * n_real + [0] * (L - n_real)  # real tokens first, then the padding tail
        for t in range(L):
            if not mask[t]:
                assert lab[t] == -100
                assert pos[t] == t - n_real  # padding tail: its own segment counting from 0
                continue
            starts_piece = (
                t == 0
                or origin[ids[t]] != (origin[ids[t - 1]][0], origin[ids[t - 1]][1] + 1)
                or (origin[ids[t]][1] % row_length == 0 and len(docs[origin[ids[t]][0]]) > row_length)
            )
            # position_ids restart exactly at document (piece) starts and count up by one inside
            assert (pos[t] == 0) == starts_piece
            if not starts_piece:
                assert pos[t] == pos[t - 1] + 1
                d, j = origin[ids[t]]
                assert lab[t] == (labels[d][j] if masked else ids[t])
            else:
                assert lab[t] == -100  # no label crosses a boundary
        # model view: shifted targets labels[t+1] never come from another document
        for t in range(L - 1):
            if lab[t + 1] != -100:
                assert mask[t] and origin[ids[t]][0] == origin[ids[t + 1]][0]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=40), row_length=st.integers(8, 64))
def test_plan_uses_no_more_rows_than_needed_by_volume_bound(lengths, row_length):
    plan = plan_packing(lengths, row_length, strategy="best_fit")
    pieces = sum(-(-n // row_length) for n in lengths)
    assert sum(e - s for row in plan for _, s, e in row) == sum(lengths)
    assert all(sum(e - s for _, s, e in row) <= row_length for row in plan)
    assert len(plan) <= pieces
    # best-fit decreasing never leaves two rows that could be merged
    fills = sorted(sum(e - s for _, s, e in row) for row in plan)
    if len(fills) >= 2:
        assert fills[0] + fills[1] > row_length


def test_piece_bounds_is_the_one_cut_of_packing_and_the_efficiency_report():
    from phi3_lightning.data.efficiency import efficiency_report
    from phi3_lightning.data.packing import piece_bounds

    assert piece_bounds(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert piece_bounds(3, 3) == [(0, 3)] and piece_bounds(0, 3) == []
    lengths = [7, 0, 2, 9]
    plan = plan_packing(lengths, 3)
    packed_pieces = sorted((d, s, e) for row in plan for d, s, e in row)
    assert packed_pieces == sorted((d, s, e) for d, n in enumerate(lengths) for s, e in piece_bounds(n, 3))
    report = efficiency_report(lengths, max_length=3, batch_size=2)
    assert report["examples"] == 3 + 1 + 3 and report["tokens"] == 18
