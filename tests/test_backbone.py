"""The frozen-backbone cache: computed once, rebuilt when backbone, catalog or k change."""

import subprocess
import sys

import pytest
import torch

from common import backbone as bb
from tests.fixtures import make_tiny_backbone

TEXTS = ["space rocket star", "love heart kiss", "crime police heist"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bb")
    return make_tiny_backbone(root / "a", seed=0), make_tiny_backbone(root / "b", seed=1)


def test_cache_is_reused_and_keyed_by_backbone_catalog_and_k(tiny, tmp_path, monkeypatch):
    calls, loads = [], []
    real, load = bb.encode_items, bb.load_backbone
    monkeypatch.setattr(bb, "encode_items", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(bb, "load_backbone", lambda name: loads.append(name) or load(name))
    a, b = str(tiny[0]), str(tiny[1])

    def states(backbone, texts=TEXTS, fingerprint="cat-1", k=0):
        return bb.cached_item_states(
            backbone, texts, fingerprint, k=k, max_tokens=6, cache_dir=tmp_path
        )

    first = states(a)
    again = states(a)
    assert len(calls) == 1 and torch.equal(first.states, again.states)  # from disk
    assert loads == [a]  # a cache hit does not load the backbone
    assert first.states.shape == (3, 32)  # k = 0: pooled vectors
    states(a, k=1)  # k changed
    states(a, texts=TEXTS + ["war tank"], fingerprint="cat-2")  # catalog changed
    other = states(b)  # backbone changed
    assert len(calls) == 4
    assert not torch.equal(first.states, other.states)
    assert len(list((tmp_path / "item-states").glob("*.safetensors"))) == 4


def test_k_blocks_states_feed_the_top_blocks(tiny):
    model = bb.load_backbone(str(tiny[0]))
    lower = bb.encode_items(model, TEXTS, k=1, max_tokens=6)
    full = bb.encode_items(model, TEXTS, k=0, max_tokens=6)
    assert lower.states.shape == (3, 5, 32)  # as long as the longest text, [CLS] and [SEP] in
    mask = (1.0 - lower.mask[:, None, None, :].float()) * -1e9
    top = model.model.encoder.layer[-1](lower.states, attention_mask=mask)
    torch.testing.assert_close(bb.mean_pool(top, lower.mask), full.states, rtol=1e-4, atol=1e-5)


def test_too_many_adapted_blocks_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="adapter-k=5 exceeds the backbone's 2"):
        bb.encode_items(bb.load_backbone(str(tiny[0])), TEXTS, k=5, max_tokens=6)


def test_training_and_model_code_import_no_flower():
    code = "import sys, common.train, common.model; assert 'flwr' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_adapted_blocks_with_block_diagonal_attention_match_the_backbone(tiny):
    """Items packed into one sequence per example must not attend to each other: with LoRA
    still at its zero init, the item tower reproduces the backbone's own pooled output."""
    from common.config import Config
    from common.model import ItemTower

    model = bb.load_backbone(str(tiny[0]))
    lower = bb.encode_items(model, TEXTS, k=1, max_tokens=6)
    full = bb.encode_items(model, TEXTS, k=0, max_tokens=6)
    tower = ItemTower(
        Config(adapter_k=1, dropout=0.0),
        hidden_size=32,
        num_items=3,
        blocks=[model.model.encoder.layer[-1]],
    ).eval()
    with torch.no_grad():
        packed = tower.pooled(lower.states[None], lower.mask[None])[0]  # 3 items, 1 sequence
    torch.testing.assert_close(packed, full.states, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [0, 1])
def test_length_bucketed_encoding_equals_each_text_alone(tiny, k):
    backbone = bb.load_backbone(str(tiny[0]))
    texts = ["war", "space rocket star orbit alien planet", "love heart", "a b c d e f g h i j"]
    batched = bb.encode_items(backbone, texts, k=k, max_tokens=64, batch_size=2)
    longest = max(len(backbone.tokenizer(t)["input_ids"]) for t in texts)
    assert batched.mask.shape == (len(texts), longest)  # no padding beyond the longest text
    for i, text in enumerate(texts):
        alone = bb.encode_items(backbone, [text], k=k, max_tokens=64)
        n = int(alone.mask.sum())
        assert int(batched.mask[i].sum()) == n
        if k == 0:
            torch.testing.assert_close(batched.states[i], alone.states[0], atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(
                batched.states[i, :n], alone.states[0, :n], atol=1e-5, rtol=1e-4
            )
