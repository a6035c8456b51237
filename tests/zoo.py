"""The zoo: models nobody here wrote, built from tiny configs, with data to train them on.

Importable as `_target_: tests.zoo:...`. No downloads: every transformers model is built from a
tiny `XxxConfig(...)`; every dataset is made in code from a seeded generator and yields dicts of
fixed-size tensors, so the default collate stacks them.

| name        | builder                  | kind                                 | data            | note                                   |
| ----------- | ------------------------ | ------------------------------------ | --------------- | -------------------------------------- |
| bert        | BertForMaskedLM          | encoder                              | Tokens (copy)   | token-level mean loss                  |
| gpt2        | GPT2LMHeadModel          | decoder                              | Tokens (causal) | position embedding is a plain Embedding |
| llama       | LlamaForCausalLM         | decoder                              | Tokens (causal) | rotary, no position embedding          |
| opt         | OPTForCausalLM           | decoder                              | Tokens (causal) | OPTLearnedPositionalEmbedding (subclass, forward takes the mask) |
| t5          | T5ForConditionalGeneration | encoder-decoder                    | Seq2Seq         | relative position bias                 |
| bart        | BartForConditionalGeneration | encoder-decoder                  | Seq2Seq         | BartLearnedPositionalEmbedding (subclass, forward takes shapes) |
| vit         | ViTForImageClassification | vision                              | Images          |                                        |
| convnext    | ConvNextForImageClassification | vision (conv, LayerNorm)       | Images          |                                        |
| segformer   | SegformerForSemanticSegmentation | vision (dense labels)        | SegMasks        |                                        |
| wav2vec2    | Wav2Vec2ForCTC           | speech, CTC                          | Speech          | forward branches on `labels.max()`     |
| mixtral     | MixtralForCausalLM       | decoder, mixture of experts          | Tokens (causal) | eager experts: a loop over `nonzero()` of the router's picks (data-dependent) |
| olmoe       | OlmoeForCausalLM         | decoder, mixture of experts          | Tokens (causal) | experts as one grouped mm (`torch._grouped_mm`; its shape-only kernel takes bf16 only) |
| nanogpt     | GPT (nanoGPT's model.py) | decoder, plain torch                 | NanoTokens      | forward(idx, targets) -> (logits, loss) |
| clip        | ContrastiveCLIP          | vision-text, contrastive             | ImageText       | batch-coupled loss (in-batch negatives) |

`ZOO` maps each name to the config fragment that trains it (`model`, `data`, `optim`, `train`);
`zoo_config(name, **sections)` returns it merged over a tiny CPU run. `HEALTHY` lists the models
whose loss is a mean over samples or tokens (everything but `clip`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VOCAB = 64
SEQ = 16


# ---- datasets ------------------------------------------------------------------------------

class Tokens(Dataset):
    """Token sequences that follow a rule (x[t+1] = x[t] + step mod vocab), so a model learns fast.

    `kind="causal"`: labels = input_ids (the model shifts them), the last `pad` positions of every
    other sample are padding (attention_mask 0, labels -100). `kind="copy"`: labels = input_ids at
    every position (a masked-LM head learns to copy). Token ids lie in [low, vocab).
    """

    def __init__(self, n: int = 64, seq_len: int = SEQ, vocab: int = VOCAB, kind: str = "causal",
                 pad: int = 0, low: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(low, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        span = vocab - low
        self.input_ids = low + (start - low + step * torch.arange(seq_len)) % span
        self.attention_mask = torch.ones(n, seq_len, dtype=torch.long)
        if pad:
            self.attention_mask[::2, seq_len - pad:] = 0
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)
        self.kind = kind

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class Seq2Seq(Dataset):
    """Source sequences and their reversal as the target (labels; the model makes decoder inputs)."""

    def __init__(self, n: int = 64, seq_len: int = SEQ, vocab: int = VOCAB, low: int = 4, seed: int = 0):
        base = Tokens(n, seq_len, vocab, low=low, seed=seed)
        self.input_ids = base.input_ids
        self.attention_mask = base.attention_mask
        self.labels = base.input_ids.flip(1)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class Images(Dataset):
    """Images whose class sets the mean of each channel (pixel_values: 3 x size x size, labels: int)."""

    def __init__(self, n: int = 64, size: int = 32, classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, 3, 1, 1, generator=g)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.pixel_values = centers[self.labels] + 0.5 * torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


class SegMasks(Dataset):
    """Images with a dense label map: a class per 8x8 block, whose channel is the bright one there."""

    def __init__(self, n: int = 32, size: int = 32, classes: int = 3, block: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randint(0, classes, (n, size // block, size // block), generator=g)
        self.labels = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)
        onehot = F.one_hot(self.labels, classes).permute(0, 3, 1, 2).float()
        self.pixel_values = 2 * onehot + 0.5 * torch.randn(n, classes, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


class Speech(Dataset):
    """Raw audio (input_values: samples floats) made of one tone per label, and CTC labels.

    Labels lie in [1, vocab) (0 is the CTC blank / pad); `pad_labels` positions at the end of every
    other sample are -100, as a padding collator leaves them.
    """

    def __init__(self, n: int = 32, samples: int = 1600, label_len: int = 6, vocab: int = 8,
                 pad_labels: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(1, vocab, (n, label_len), generator=g)
        seg = samples // label_len
        t = torch.arange(seg, dtype=torch.float32)
        waves = torch.sin(t[None, None] * self.labels[..., None] * 0.3)  # one tone per label
        self.input_values = torch.zeros(n, samples)
        self.input_values[:, : seg * label_len] = waves.reshape(n, -1)
        self.input_values += 0.05 * torch.randn(n, samples, generator=g)
        if pad_labels:
            self.labels[::2, label_len - pad_labels:] = -100

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_values": self.input_values[i], "labels": self.labels[i]}


class NanoTokens(Dataset):
    """nanoGPT's batches: `idx` (block_size token ids) and `targets` (the same, shifted by one)."""

    def __init__(self, n: int = 64, block_size: int = SEQ, vocab: int = VOCAB, seed: int = 0):
        base = Tokens(n, block_size + 1, vocab, seed=seed)
        self.idx = base.input_ids[:, :-1].contiguous()
        self.targets = base.input_ids[:, 1:].contiguous()

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> dict:
        return {"idx": self.idx[i], "targets": self.targets[i]}


class ImageText(Dataset):
    """Image-caption pairs: the caption's tokens and the image's channel means both encode the pair's id."""

    def __init__(self, n: int = 32, size: int = 32, seq_len: int = 8, vocab: int = VOCAB, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 8, (n,), generator=g)
        centers = torch.randn(8, 3, 1, 1, generator=g)
        self.pixel_values = centers[ids] + 0.3 * torch.randn(n, 3, size, size, generator=g)
        self.input_ids = (4 + ids[:, None] * 7 + torch.arange(seq_len)) % vocab
        self.attention_mask = torch.ones(n, seq_len, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "pixel_values": self.pixel_values[i]}


# ---- transformers models from tiny configs --------------------------------------------------

def _lm(**kw) -> dict:
    """The sizes every tiny language model shares."""
    return dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, **kw)


def bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(**_lm(max_position_embeddings=64)))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_lm(num_key_value_heads=1, max_position_embeddings=64)))


def opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64,
                                    pad_token_id=1, bos_token_id=2, eos_token_id=2))


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                               num_heads=2, decoder_start_token_id=0, pad_token_id=0))


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                                   pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                                   decoder_start_token_id=2, forced_eos_token_id=None))


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=64, num_labels=4))


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    return ConvNextForImageClassification(ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                                         patch_size=4, num_labels=4))


def segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(SegformerConfig(
        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=16, num_labels=3))


def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    return Wav2Vec2ForCTC(Wav2Vec2Config(
        vocab_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="group", do_stable_layer_norm=False,
        mask_time_prob=0.0, pad_token_id=0, ctc_loss_reduction="mean", ctc_zero_infinity=True))


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**_lm(num_key_value_heads=1, max_position_embeddings=64,
                                                  num_local_experts=4, num_experts_per_tok=2,
                                                  experts_implementation="eager")))


def olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM(OlmoeConfig(**_lm(num_key_value_heads=1, max_position_embeddings=64, num_experts=4,
                                              num_experts_per_tok=2, experts_implementation="grouped_mm",
                                              pad_token_id=1, bos_token_id=0, eos_token_id=2)))


def _clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=16, pad_token_id=1,
                         bos_token_id=0, eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=64),
        projection_dim=16)


def clip():
    """CLIP with its contrastive loss: each image's caption against every other caption of the batch."""
    return ContrastiveCLIP()


try:
    from transformers import CLIPModel as _CLIPBase
except ImportError:  # the zoo's tests skip without transformers; this module stays importable
    _CLIPBase = nn.Module


class ContrastiveCLIP(_CLIPBase):
    """transformers' CLIPModel that always returns its contrastive loss (`return_loss=True`)."""

    def __init__(self):
        super().__init__(_clip_config())

    def forward(self, input_ids, pixel_values, attention_mask=None):
        return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                               return_loss=True)


# ---- nanoGPT's model.py (Karpathy), unchanged but for the tiny defaults ----------------------

class LayerNorm(nn.Module):
    """ LayerNorm but with an optional bias. PyTorch doesn't support simply bias=False """

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = hasattr(torch.nn.functional, 'scaled_dot_product_attention')
        if not self.flash:
            self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                                 .view(1, 1, config.block_size, config.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                                                 dropout_p=self.dropout if self.training else 0,
                                                                 is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf'))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    block_size: int = SEQ
    vocab_size: int = VOCAB
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True


class GPT(nn.Module):

    def __init__(self, config=None, **kw):
        super().__init__()
        config = config if config is not None else GPTConfig(**kw)  # trainguard builds it from keyword arguments
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying

        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)

        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference-time mini-optimization
            loss = None

        return logits, loss


# ---- plain-torch cases for the model checks (tests/test_model_checks.py) ---------------------

class LearnedPositions(nn.Embedding):
    """OPT's learned positional embedding: forward takes the attention mask (here float, as
    some collators give it) and looks up the positions it derives, shifted by an offset of 2."""

    def __init__(self, num_positions: int, dim: int):
        self.offset = 2
        super().__init__(num_positions + self.offset, dim)

    def forward(self, attention_mask: torch.Tensor, past_key_values_length: int = 0):
        positions = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()[:, past_key_values_length:]
        return super().forward(positions + self.offset)


class PositionalLM(nn.Module):
    """A causal LM with token embeddings and :class:`LearnedPositions`; forward(input_ids, attention_mask, labels)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, max_positions: int = SEQ):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = LearnedPositions(max_positions, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask, labels=None):
        h = self.tokens(input_ids) + self.positions(attention_mask.float())
        logits = self.head(torch.cumsum(h, 1) / torch.arange(1, h.shape[1] + 1, device=h.device)[:, None])
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return {"logits": logits, "loss": loss}


class UnevenTokens(Tokens):
    """Tokens where only the first half of the samples is padded: the halves have different label counts."""

    def __init__(self, n: int = 16, pad: int = 6, **kw):
        super().__init__(n, **kw)
        self.attention_mask[: n // 2, -pad:] = 0
        self.labels = self.input_ids.masked_fill(self.attention_mask == 0, -100)


class FloatIds(Tokens):
    """Token ids under the field name `tokens`, stored as floats (read back through pandas with a NaN)."""

    def __getitem__(self, i: int) -> dict:
        item = super().__getitem__(i)
        return {"tokens": item.pop("input_ids").float(), **item}


class Pairs(Dataset):
    """Paired views (`a`, `b`: features of the same item, seen two ways): CLIP's data in miniature."""

    def __init__(self, n: int = 64, dim: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, dim, generator=g)
        self.a = z + 0.1 * torch.randn(n, dim, generator=g)
        self.b = z.flip(1) + 0.1 * torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: int) -> dict:
        return {"a": self.a[i], "b": self.b[i]}


class Contrastive(nn.Module):
    """CLIP's symmetric InfoNCE loss: each `a` against every `b` of the batch (in-batch negatives)."""

    def __init__(self, dim: int = 8, out: int = 16, reduction: str = "contrastive"):
        super().__init__()
        self.fa, self.fb = nn.Linear(dim, out), nn.Linear(dim, out)
        self.reduction = reduction

    def forward(self, a, b):
        za, zb = F.normalize(self.fa(a), dim=-1), F.normalize(self.fb(b), dim=-1)
        if self.reduction == "sum":  # per-sample losses summed, not averaged
            return (za - zb).pow(2).sum()
        logits = za @ zb.T / 0.1
        target = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class SumLoss(Contrastive):
    """The paired towers with a per-sample loss summed over the batch (`reduction="sum"`)."""

    def __init__(self, **kw):
        super().__init__(reduction="sum", **kw)


# ---- the configs that train them -------------------------------------------------------------

def _entry(model: str, data: str, lr: float = 3e-3, **data_kw) -> dict:
    return {"model": {"_target_": f"tests.zoo:{model}"},
            "data": {"train": {"_target_": f"tests.zoo:{data}", **data_kw}},
            "optim": {"lr": lr}}


ZOO: dict[str, dict] = {
    "bert": _entry("bert", "Tokens", kind="copy"),
    "gpt2": _entry("gpt2", "Tokens", pad=4),
    "llama": _entry("llama", "Tokens", pad=4),
    "opt": _entry("opt", "Tokens", pad=4),
    "t5": _entry("t5", "Seq2Seq"),
    "bart": _entry("bart", "Seq2Seq"),
    "vit": _entry("vit", "Images"),
    "convnext": _entry("convnext", "Images"),
    "segformer": _entry("segformer", "SegMasks", lr=1e-2),
    "wav2vec2": _entry("wav2vec2", "Speech"),
    "mixtral": _entry("mixtral", "Tokens", pad=4),
    "olmoe": _entry("olmoe", "Tokens", pad=4),
    "nanogpt": _entry("GPT", "NanoTokens"),
    "clip": _entry("clip", "ImageText"),
}
HEALTHY = [name for name in ZOO if name != "clip"]


def zoo_config(name: str, **sections) -> dict:
    """A tiny CPU run of zoo model `name`; sections given here are merged over it (one level deep)."""
    cfg = {"hardware": "cpu", "seed": 0,
           "schedule": {"name": "constant", "warmup_steps": 0},
           "train": {"max_steps": 20, "batch_size": 8, "micro_batch_size": 8, "log_every": 5, "precision": "fp32"},
           "checkpoint": {"every_steps": 0}}
    for part in (ZOO[name], sections):
        for k, v in part.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg
