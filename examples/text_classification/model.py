"""A BERT classifier from Hugging Face `transformers`, built from a config so nothing is downloaded
(with a hub checkpoint you would call `AutoModelForSequenceClassification.from_pretrained(...)`).
Its forward() takes input_ids, attention_mask, token_type_ids and labels (plus **kwargs): not the
rows' `idx`, `sentence` or `label`."""

from __future__ import annotations

from examples.text_classification.reviews import tokenizer


def bert_classifier(root: str = "data/text_classification", hidden: int = 256, layers: int = 4, heads: int = 4,
                    max_length: int = 128, num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    tok = tokenizer(root)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=max_length, num_labels=num_labels,
                        pad_token_id=tok.pad_token_id)
    return BertForSequenceClassification(config)
