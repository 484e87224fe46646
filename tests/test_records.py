"""Training records: windows of a user's sequence, every interaction a target once."""

import numpy as np

from common.records import PAD, build_records, left_pad

_ = PAD


def test_windows_are_cut_from_the_end_as_documented():
    a, b, c, d, e, f, g, h = range(8)
    records = build_records([np.array([a, b, c, d, e, f, g, h]), np.array([5])], history_len=3)
    assert records.inputs.tolist() == [[_, _, a], [b, c, d], [e, f, g]]
    assert records.targets.tolist() == [[_, _, b], [c, d, e], [f, g, h]]
    assert records.user.tolist() == [0, 0, 0]  # a one-item user predicts nothing
    assert records.num_targets == 7 and records.num_users == 1


def test_every_interaction_after_the_first_is_a_target_exactly_once():
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 50, size=n) for n in (2, 7, 50, 51, 123)]
    records = build_records(sequences, history_len=10)
    for user, seq in enumerate(sequences):
        mine = records.user == user
        targets = records.targets[mine]
        assert sorted(targets[targets != PAD].tolist()) == sorted(seq[1:].tolist())
        # each target's input is the item just before it in the sequence
        flat = np.stack([records.inputs[mine], targets], -1).reshape(-1, 2)
        pairs = {tuple(p) for p in flat if p[1] != PAD}
        assert pairs == set(zip(seq[:-1].tolist(), seq[1:].tolist(), strict=True))


def test_left_pad_keeps_the_newest_items():
    assert left_pad(np.array([1, 2, 3]), 5).tolist() == [_, _, 1, 2, 3]
    assert left_pad(np.array([1, 2, 3]), 2).tolist() == [2, 3]


def test_overlapping_windows_give_every_target_a_longer_history():
    a, b, c, d, e, f, g, h = range(8)
    records = build_records([np.arange(8)], history_len=4, stride=2)
    assert records.inputs.tolist() == [[_, _, _, a], [_, a, b, c], [b, c, d, e], [d, e, f, g]]
    assert records.targets.tolist() == [[_, _, _, b], [_, _, c, d], [_, _, e, f], [_, _, g, h]]
    rng = np.random.default_rng(1)
    seq = rng.permutation(200)
    records = build_records([seq], history_len=50, stride=10)
    targets = records.targets[records.targets != PAD]
    assert sorted(targets.tolist()) == sorted(seq[1:].tolist())  # each once
    for window_in, window_out in zip(records.inputs, records.targets, strict=True):
        for pos in np.nonzero(window_out != PAD)[0]:  # history before each target
            seen = int((window_in[: pos + 1] != PAD).sum())
            before = int(np.nonzero(seq == window_out[pos])[0][0])  # items before the target
            assert min(before, 50 - 10 + 1) <= seen <= min(before, 50)
