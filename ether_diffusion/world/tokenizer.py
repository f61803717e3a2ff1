"""A CLIP tokenizer whose vocabulary is the tiny world's words.

CLIP's BPE starts from characters (the last one carrying ``</w>``) and applies merges by rank. For each world
word we add the chain of merges that builds it left to right (``s t`` -> ``st``, ``st a`` -> ``sta``, ...), with
every intermediate piece in the vocabulary, plus all single characters: a world word becomes one token, and any
other word (``sks``, a typo) still tokenizes, into pieces. ``encode_world_caption`` is a fast path for captions
made only of world words, checked against the real tokenizer in the tests.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from .attributes import world_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 32


def _merge_chain(word: str) -> list[tuple[str, str]]:
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    chain, prefix = [], pieces[0]
    for piece in pieces[1:]:
        chain.append((prefix, piece))
        prefix = prefix + piece
    return chain


def _ordered_merges(order: list[str], chains: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for word in order:
        merges += [pair for pair in chains[word] if pair not in merges]
    return merges


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none is left."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pair = (pieces[i], pieces[i + 1])
        merged, j = [], 0
        while j < len(pieces):
            if j < len(pieces) - 1 and (pieces[j], pieces[j + 1]) == pair:
                merged.append(pieces[j] + pieces[j + 1])
                j += 2
            else:
                merged.append(pieces[j])
                j += 1
        pieces = merged
    return pieces


def build_vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = words if words is not None else world_words()
    tokens: list[str] = []

    def add(token: str) -> None:
        if token not in tokens:
            tokens.append(token)

    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        add(ch)
        add(ch + "</w>")
    chains = {w: _merge_chain(w) for w in words if len(w) > 1 and w.isalpha()}
    order = sorted(chains, key=lambda w: (-len(w), w))
    # A word's chain can be broken by another word's merge ranked earlier ("tr" from "triangle" inside
    # "striped"); move a broken word's chain to the front until every world word is one token.
    for _ in range(4 * len(order)):
        merges = _ordered_merges(order, chains)
        broken = [w for w in order if _bpe(w, merges) != [w + "</w>"]]
        if not broken:
            break
        order.remove(broken[0])
        order.insert(0, broken[0])
    else:
        raise RuntimeError(f"could not order BPE merges so that {broken} are single tokens")
    for left, right in merges:
        add(left + right)
    add(BOS)
    add(EOS)
    return {token: i for i, token in enumerate(tokens)}, merges


def write_vocab_and_merges(directory: str | Path) -> Path:
    """vocab.json and merges.txt: what the slow ``CLIPTokenizer`` (transformers 4) reads; transformers 5 also
    writes tokenizer.json, and a pipeline folder holding both loads with either."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges))
    return directory


def save_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config for ``CLIPTokenizer.from_pretrained``."""
    directory = write_vocab_and_merges(directory)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2) + "\n"
    )
    return directory


def load_tokenizer(directory: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(directory))


def encode_world_caption(text: str, vocab: dict[str, int], max_length: int = MODEL_MAX_LENGTH) -> list[int]:
    """Token ids of a caption made of world words, padded with EOS like the pipeline's tokenizer call
    (``padding="max_length"``, ``truncation=True``). Raises KeyError on a word outside the world."""
    ids = [vocab[BOS]]
    for word in text.lower().replace(",", " , ").split():
        ids.append(vocab[word + "</w>"])
    ids = ids[: max_length - 1] + [vocab[EOS]]
    return ids + [vocab[EOS]] * (max_length - len(ids))
