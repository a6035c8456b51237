"""Toys for the user's collator, mapping batches and tuple outputs (tests/test_collate.py).

No downloads: the tokenizer is a ``tokenizers`` WordLevel vocabulary built in code.
"""

from collections import UserDict

import torch
from torch import nn
from torch.utils.data import Dataset

VOCAB = 32  # [PAD]=0, [UNK]=1, then w2..w31


def tiny_tokenizer():
    """A PreTrainedTokenizerFast over a 32-word WordLevel vocabulary, padding with id 0 on the right."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


class RaggedTokens(Dataset):
    """Token-id lists of 3..12 tokens (what a tokenizer returns before padding) and a class label:
    whether the sequence holds more high ids (>= 17) than low ones, beside the raw `text` (a string
    the model does not take, as a tokenized Hugging Face dataset keeps it: it must never reach a
    padding collator, which cannot make a tensor of it). ``bad``: samples that lack ``input_ids``
    (a padding collator raises on them)."""

    def __init__(self, n: int = 96, bad: tuple = ()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(1000 + i)
        length = int(torch.randint(3, 13, (), generator=g))
        ids = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        label = int(sum(t >= 17 for t in ids) * 2 > length)
        text = " ".join(f"w{t}" for t in ids)
        if i in self.bad:
            return {"labels": label, "text": text}
        return {"input_ids": ids, "labels": label, "text": text}


class BagClassifier(nn.Module):
    """Embedding, dropout, masked mean, linear: needs the collator's attention_mask."""

    def __init__(self, dim: int = 16, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask, labels=None):
        m = attention_mask.unsqueeze(-1).float()
        h = (self.drop(self.emb(input_ids)) * m).sum(1) / m.sum(1).clamp(min=1)
        logits = self.head(h)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Broken:
    """A collator that fails on every batch (its own bug, not a sample's)."""

    def __call__(self, samples):
        raise RuntimeError("collator bug: no padding token configured")


class EncodedItems(Dataset):
    """Each item a transformers ``BatchEncoding`` (a UserDict, not a dict) of fixed-length tensors."""

    def __init__(self, n: int = 64, length: int = 6):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from transformers import BatchEncoding

        g = torch.Generator().manual_seed(i)
        ids = torch.randint(2, VOCAB, (self.length,), generator=g, dtype=torch.int32)  # int32: widened to long
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones(self.length, dtype=torch.int32),
                              "labels": int((ids >= 17).sum() * 2 > self.length)})


class UserDictOutput(BagClassifier):
    """The classifier, returning a UserDict (a Mapping, not a dict) with `loss`."""

    def forward(self, input_ids, attention_mask, labels=None):
        return UserDict(super().forward(input_ids, attention_mask, labels))


class NextToken(Dataset):
    """(idx, targets) pairs of a repeating sequence: targets are idx shifted by one."""

    def __init__(self, n: int = 64, block: int = 8):
        self.n, self.block = n, block

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        seq = torch.tensor([(i + k) % VOCAB for k in range(self.block + 1)])
        return seq[:-1], seq[1:]


class TupleGPT(nn.Module):
    """nanoGPT's interface: ``forward(idx, targets=None) -> (logits, loss)``."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.lm_head = nn.Linear(dim, VOCAB)

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.wte(idx))
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def lambda_collator():
    """A collator that cannot be pickled (a lambda): spawned loader workers cannot receive it."""
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tiny_tokenizer())
    return lambda samples: pad(samples)


class MaskingCollator:
    """Pads like DataCollatorWithPadding, then masks each token with probability 0.15 by a draw from
    torch's global RNG (as DataCollatorForLanguageModeling does): only a seeded collate makes that
    the same with 0 or N workers and after a resume."""

    def __call__(self, samples):
        width = max(len(s["input_ids"]) for s in samples)
        ids = torch.zeros(len(samples), width, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for r, s in enumerate(samples):
            ids[r, :len(s["input_ids"])] = torch.tensor(s["input_ids"])
            mask[r, :len(s["input_ids"])] = 1
        ids[(torch.rand(ids.shape) < 0.15) & (mask == 1)] = 1  # [UNK]
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([s["labels"] for s in samples])}


class TokenizingCollator:
    """Tokenizes each sample's raw `text` itself (as a processor does): it needs a field the model
    does not take, so it runs with data.filter_fields: false."""

    def __init__(self):
        self.tok = tiny_tokenizer()

    def __call__(self, samples):
        enc = self.tok([s["text"] for s in samples], padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([s["labels"] for s in samples])}
