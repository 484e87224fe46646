"""Builders for offline tests: a tiny random BERT and a synthetic catalog with learnable structure.

Plain functions (not pytest fixtures) so that any test, benchmark or script can call them:

    backbone = make_tiny_backbone(tmp_path / "bert")       # a directory for `backbone`
    data = make_synthetic_dataset(tmp_path / "data")       # a directory for `data-path`
"""

from __future__ import annotations

import csv
import random
import string
from pathlib import Path

# Each topic has its own words; an item's text is made of its topic's words, so the text
# tells which topic an item belongs to.
TOPICS = {
    "space": ["space", "rocket", "planet", "star", "orbit", "alien"],
    "romance": ["love", "heart", "kiss", "wedding", "romance", "date"],
    "crime": ["crime", "detective", "murder", "police", "heist", "gang"],
    "western": ["horse", "cowboy", "desert", "sheriff", "ranch", "outlaw"],
    "music": ["music", "song", "band", "dance", "concert", "guitar"],
    "war": ["war", "soldier", "battle", "army", "tank", "general"],
}
FILLER = ["the", "a", "of", "and", "story", "night", "day", "return", "last", "first"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocab() -> list[str]:
    """The tiny WordPiece vocabulary: special tokens, topic and filler words, letters, digits."""
    words = sorted({w for ws in TOPICS.values() for w in ws} | set(FILLER))
    letters = list(string.ascii_lowercase) + list(string.digits)
    pieces = [f"##{c}" for c in letters]  # so unknown words split into letters, not [UNK]
    punctuation = list(".,:;()!?'-")
    return list(dict.fromkeys(SPECIAL_TOKENS + words + letters + pieces + punctuation))


def make_tiny_backbone(directory: str | Path, *, seed: int = 0) -> Path:
    """A randomly initialised 2-layer, 32-wide BertModel and its tokenizer, saved to directory."""
    # imported here so that the data builder works without loading torch
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    # from_pretrained reads vocab.txt under transformers 4 and 5 alike (the constructor's
    # argument is `vocab_file` in 4 and `vocab` in 5, and 5 ignores the old name silently)
    tokenizer = BertTokenizerFast.from_pretrained(directory, do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if tokenizer.convert_tokens_to_ids("space") == tokenizer.unk_token_id:
        raise RuntimeError(f"The tiny tokenizer in {directory} did not read vocab.txt.")
    return directory


def make_synthetic_dataset(
    directory: str | Path,
    *,
    num_users: int = 40,
    num_items: int = 60,
    min_length: int = 8,
    max_length: int = 14,
    noise: float = 0.1,
    seed: int = 0,
) -> Path:
    """A generic CSV pair (interactions.csv, items.csv) in directory, returned.

    Structure a model can learn: item i belongs to topic i % T and its text uses that topic's
    words; each topic's items form a chain (i, i + T, i + 2T, ...). A user likes one or two
    topics and walks their chains in order, one step at a time, with a `noise` share of random
    other items. So the next item is mostly "the next one in the chain of a topic the user
    likes": a trained sequential model beats random ranking (HR@10 about 10 / num_items).
    """
    if num_items < 2 * len(TOPICS):
        raise ValueError(f"num_items must be at least {2 * len(TOPICS)}, got {num_items}.")
    if min_length < 3 or max_length < min_length:
        raise ValueError("Need 3 <= min_length <= max_length (train, validation and test).")
    rng = random.Random(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    topics = list(TOPICS)
    chains = {
        t: [i for i in range(num_items) if i % len(topics) == k] for k, t in enumerate(topics)
    }

    with open(directory / "items.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item_id", "text"])
        for item in range(num_items):
            topic = topics[item % len(topics)]
            words = rng.sample(TOPICS[topic], 3) + [rng.choice(FILLER)]
            rng.shuffle(words)
            writer.writerow([f"i{item}", " ".join(words)])

    with open(directory / "interactions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for user in range(num_users):
            liked = rng.sample(topics, rng.choice((1, 2)))
            position = {t: rng.randrange(len(chains[t])) for t in liked}
            available = sum(len(chains[t]) for t in liked)
            length = min(rng.randint(min_length, max_length), available)
            seen: list[int] = []
            timestamp = 1_000_000 + user * 10_000
            while len(seen) < length:
                if rng.random() < noise:
                    item = rng.randrange(num_items)
                else:
                    topic = rng.choice(liked)
                    chain = chains[topic]
                    item = chain[position[topic] % len(chain)]
                    position[topic] += 1
                if item in seen:
                    continue
                seen.append(item)
                timestamp += rng.randint(1, 600)
                writer.writerow([f"u{user}", f"i{item}", timestamp])
    return directory
