"""Whole-word tokenizer for catalogue titles (a `tokenizers` WordLevel model).

Titles are brand + gender + colour + type: whole words (split on whitespace only, so "T-Shirt" and
"Men's" stay one token) make a short sequence and decode back to the exact title.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order


def _word_level(vocab: dict[str, int] | None = None) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def train_tokenizer(titles: Iterable[str], *, min_frequency: int = 2, vocab_size: int = 20000) -> Tokenizer:
    tok = _word_level()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS)
    )
    tok.train_from_iterator(titles, trainer=trainer)
    return tok


def with_words(tokenizer: Tokenizer, words: Iterable[str]) -> Tokenizer:
    """The tokenizer with `words` it lacks added after its own (the ids of its own words unchanged)."""
    vocab = dict(tokenizer.get_vocab())
    for word in words:
        vocab.setdefault(word, len(vocab))
    return _word_level(vocab)


class TitleCodec:
    """Encodes titles to fixed-length id rows and decodes generated ids back to text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        found = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        ids = [i for i in found if i is not None]
        if len(ids) != len(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer lacks one of the special tokens {SPECIAL_TOKENS}")
        self.pad, self.bos, self.eos, self.unk = ids
        self.vocab_size = tokenizer.get_vocab_size()
        # [UNK] stands for a word too rare to have its own id; a title is better without it than with it.
        self._special = {self.pad, self.bos, self.eos, self.unk}

    @classmethod
    def from_json(cls, text: str) -> TitleCodec:
        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def encode(self, title: str, max_tokens: int) -> list[int]:
        """Title -> ids ending with EOS, truncated to max_tokens (EOS dropped if it does not fit)."""
        ids = [*self.tokenizer.encode(title).ids, self.eos]
        return ids[:max_tokens]

    def decode(self, ids: Sequence[int]) -> str:
        words: list[str] = []
        for i in ids:
            if i == self.eos:
                break
            if i in self._special:
                continue
            words.append(self.tokenizer.id_to_token(int(i)) or "")
        return " ".join(word for word in words if word)
