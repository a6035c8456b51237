"""Product reviews as GLUE-style rows (`sentence`, `label`, `idx`), read from local JSON files with
Hugging Face `datasets` and tokenized with a `transformers` tokenizer, as in field report 000.

Nothing is downloaded: the JSON files are written on first use (from word lists, with a seed) and
the WordPiece tokenizer is trained on the training sentences with `tokenizers`, then saved and
loaded back with `AutoTokenizer`. With a hub model you would call
`AutoTokenizer.from_pretrained("bert-base-uncased")` instead; nothing else changes.

After `.map(tokenize)` each row holds `input_ids`, `token_type_ids` and `attention_mask` as Python
lists of ints, beside `sentence` (a string), `label` and `idx`: the fields that, handed to a
model as they are, gave the field report's "unexpected keyword argument 'idx'" and "only integer
tensors of a single element can be converted to an index"."""

from __future__ import annotations

import json
import random
from pathlib import Path

GOOD = "great excellent lovely sturdy fast reliable comfortable perfect brilliant solid".split()
BAD = "awful broken flimsy slow noisy useless cheap faulty terrible disappointing".split()
THINGS = "headphones kettle backpack charger lamp keyboard blender jacket tent monitor".split()
FILLER = "the this my it was is really quite very and but after a week month of use i think".split()


def _sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 20))]
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(GOOD if label else BAD))
    if rng.random() < 0.3:  # a word of the other side, so the task is not a lookup of one word
        words.insert(rng.randrange(len(words) + 1), rng.choice(BAD if label else GOOD))
    return " ".join([rng.choice(THINGS)] + words)


def prepare(root: str | Path, sizes: dict[str, int] | None = None) -> dict[str, str]:
    """`<root>/<split>.jsonl` for train and validation (written once), as `data_files` for load_dataset."""
    root = Path(root)
    files = {}
    for seed, (split, n) in enumerate((sizes or {"train": 8000, "validation": 500}).items()):
        path = root / f"{split}.jsonl"
        if not path.exists():
            rng = random.Random(seed)
            root.mkdir(parents=True, exist_ok=True)
            rows = [{"sentence": _sentence(rng, label), "label": label, "idx": i}
                    for i, label in enumerate(rng.randint(0, 1) for _ in range(n))]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(path)
        files[split] = str(path)
    return files


def tokenizer(root: str | Path = "data/text_classification"):
    """A BERT-style WordPiece tokenizer trained on the training sentences (saved once, then loaded)."""
    from transformers import AutoTokenizer

    folder = Path(root) / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        train_file = prepare(root)["train"]
        sentences = (json.loads(line)["sentence"] for line in open(train_file))
        tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def reviews(root: str = "data/text_classification", split: str = "train", max_length: int = 64,
            sizes: dict[str, int] | None = None, padding: str | bool = "max_length"):
    """The split as a `datasets.Dataset` of tokenized rows (a map-style dataset trainguard reads as is).
    ``padding: false`` leaves each row its own length, for a padding collator (dynamic padding)."""
    from datasets import load_dataset

    files = prepare(root, sizes)
    tok = tokenizer(root)
    ds = load_dataset("json", data_files=files, split=split, cache_dir=str(Path(root) / ".hf_cache"))
    return ds.map(lambda rows: tok(rows["sentence"], truncation=True, padding=padding, max_length=max_length),
                  batched=True)
