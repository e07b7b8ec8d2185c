import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, SequentialSampler

from phi3_lightning.data.collate import LengthGroupedSampler, PaddingCollator, padding_efficiency

PAD = 9


def _examples(lengths, start=100):
    out, v = [], start
    for n in lengths:
        ids = list(range(v, v + n))
        v += n
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def test_right_padding():
    batch = PaddingCollator(PAD)(_examples([3, 1]))
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "labels"}
    assert batch["input_ids"].tolist() == [[100, 101, 102], [103, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch["labels"].tolist() == [[100, 101, 102], [103, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_left_padding_positions():
    batch = PaddingCollator(PAD, padding_side="left")(_examples([3, 1]))
    assert batch["input_ids"].tolist() == [[100, 101, 102], [PAD, PAD, 103]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]  # cumsum(mask) - 1, clamped at 0
    assert batch["labels"].tolist() == [[100, 101, 102], [-100, -100, 103]]
    batch = PaddingCollator(PAD, padding_side="left")(_examples([4, 2]))
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]


def test_pad_to_multiple_of():
    batch = PaddingCollator(PAD, pad_to_multiple_of=8)(_examples([3, 5]))
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].sum().item() == 8
    batch = PaddingCollator(PAD, pad_to_multiple_of=8)(_examples([8]))
    assert batch["input_ids"].shape == (1, 8)
    batch = PaddingCollator(PAD, pad_to_multiple_of=3)(_examples([4, 2]))
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0, :4].tolist() == [100, 101, 102, 103]
    assert batch["labels"][0, 4:].tolist() == [-100, -100]


def test_sequence_level_labels():
    col = PaddingCollator(PAD)
    single = col([{"input_ids": [1, 2], "labels": 2}, {"input_ids": [3], "labels": 0}])
    assert single["labels"].dtype == torch.long and single["labels"].tolist() == [2, 0]
    reg = col([{"input_ids": [1, 2], "labels": 0.5}, {"input_ids": [3], "labels": -1.0}])
    assert reg["labels"].dtype == torch.float and reg["labels"].tolist() == [0.5, -1.0]
    multi = col([{"input_ids": [1, 2], "labels": [1.0, 0.0, 1.0]}, {"input_ids": [3], "labels": [0.0, 0.0, 0.0]}])
    assert multi["labels"].dtype == torch.float and multi["labels"].shape == (2, 3)
    # a multi-hot vector as long as the sequence is still multi-label (floats), not token labels
    multi2 = col([{"input_ids": [1, 2], "labels": [1.0, 0.0]}])
    assert multi2["labels"].dtype == torch.float and multi2["labels"].shape == (1, 2)


def test_index_and_label_pad_id():
    batch = PaddingCollator(PAD, label_pad_id=-1)(
        [{"input_ids": [1, 2], "labels": [1, 2], "index": 7}, {"input_ids": [3], "labels": [3], "index": 2}]
    )
    assert batch["index"].tolist() == [7, 2]
    assert batch["labels"].tolist() == [[1, 2], [3, -1]]


def test_packed_rows_keep_their_position_ids():
    ex = {
        "input_ids": torch.tensor([5, 6, 7, 8]),
        "attention_mask": torch.tensor([1, 1, 1, 0]),
        "position_ids": torch.tensor([0, 1, 0, 0]),
        "labels": torch.tensor([-100, 6, -100, -100]),
    }
    batch = PaddingCollator(PAD)([ex, ex])
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0]] * 2
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0]] * 2
    batch = PaddingCollator(PAD)([ex, {k: v[:2] for k, v in ex.items()}])
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1]  # padding counts on as its own segment


def test_collator_errors():
    with pytest.raises(ValueError, match="padding_side='middle'"):
        PaddingCollator(PAD, padding_side="middle")
    with pytest.raises(ValueError, match="empty list of examples"):
        PaddingCollator(PAD)([])
    with pytest.raises(ValueError, match="0 tokens"):
        PaddingCollator(PAD)([{"input_ids": []}])


@settings(max_examples=80, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    side=st.sampled_from(["left", "right"]),
    multiple=st.sampled_from([None, 1, 4, 8]),
)
def test_padding_property(lengths, side, multiple):
    examples = _examples(lengths)
    batch = PaddingCollator(PAD, padding_side=side, pad_to_multiple_of=multiple)(examples)
    B, T = batch["input_ids"].shape
    assert B == len(lengths) and T >= max(lengths)
    if multiple:
        assert T % multiple == 0
    for i, ex in enumerate(examples):
        mask = batch["attention_mask"][i].bool()
        assert mask.sum().item() == lengths[i]
        assert batch["input_ids"][i][mask].tolist() == ex["input_ids"]  # every real token, in order
        assert (batch["input_ids"][i][~mask] == PAD).all()
        assert (batch["labels"][i][~mask] == -100).all()
        assert batch["position_ids"][i][mask].tolist() == list(range(lengths[i]))


# ------------------------------------------------------------------------------------------------ length grouping
def test_length_grouped_sampler_covers_each_index_once():
    lengths = [((i * 37) % 101) + 1 for i in range(203)]
    sampler = LengthGroupedSampler(range(203), batch_size=8, lengths=lengths, mega_batch_mult=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203))
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first
    # grouping pads much less than the plain order
    grouped = padding_efficiency([[lengths[i] for i in b] for b in batches])
    plain = padding_efficiency([lengths[j : j + 8] for j in range(0, 203, 8)])
    assert grouped > plain + 0.15


def test_length_grouped_sampler_determinism_and_epochs():
    lengths = list(range(1, 101))
    a = LengthGroupedSampler(range(100), batch_size=4, lengths=lengths, mega_batch_mult=5, seed=3)
    b = LengthGroupedSampler(range(100), batch_size=4, lengths=lengths, mega_batch_mult=5, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(i for bt in a for i in bt) == list(range(100))


@pytest.mark.parametrize(
    "n,bs,mult,drop_last",
    [(10, 3, 2, False), (10, 3, 2, True), (12, 3, 2, True), (7, 8, 3, False), (7, 8, 3, True), (48, 4, 3, True)],
)
def test_length_grouped_sampler_len(n, bs, mult, drop_last):
    s = LengthGroupedSampler(range(n), bs, drop_last=drop_last, lengths=[1] * n, mega_batch_mult=mult)
    batches = list(s)
    assert len(batches) == len(s)
    if drop_last:
        assert all(len(b) == bs for b in batches)


def test_length_grouped_sampler_in_dataloader():
    data = _examples([1, 5, 2, 7, 3, 3, 9, 1])
    lengths = [len(d["input_ids"]) for d in data]
    bs = LengthGroupedSampler(SequentialSampler(data), 2, lengths=lengths, shuffle=False)
    loader = DataLoader(data, batch_sampler=bs, collate_fn=PaddingCollator(PAD))
    seen = sum(int(b["attention_mask"].sum()) for b in loader)
    assert seen == sum(lengths)


def test_padding_efficiency():
    assert padding_efficiency([[2, 4]]) == pytest.approx(6 / 8)
    assert padding_efficiency([[2, 4]], pad_to_multiple_of=8) == pytest.approx(6 / 16)
    assert padding_efficiency([]) == 0.0
