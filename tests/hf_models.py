"""Tiny Hugging Face ``transformers`` models of seven families, built from configs (random weights,
nothing downloaded). Each builder returns ``(model, example_inputs)`` like ``tests/models.py``; none of
these root ``forward`` methods is traceable by torch.fx (they take ``**kwargs``), so compressc traces
them with its torch.export frontend. ``transformers`` is imported only when a builder runs.

``HF_MODELS`` holds the base models (``BertModel`` ...), whose output is the hidden width;
``HF_TASK_MODELS`` the same families with the task heads users compress (``BertForSequenceClassification``
...), whose outputs are logits, so their hidden width can be pruned."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

__all__ = ["HF_MODELS", "HF_TASK_MODELS", "LogitsOnly"]

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _ids() -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1)),)


def _seq2seq() -> tuple[torch.Tensor, ...]:  # forward(input_ids, attention_mask, decoder_input_ids)
    (ids,) = _ids()
    return ids, torch.ones_like(ids), ids


def _image() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


# family: (config class, config, base model class, task model class, inputs). The causal LMs' task
# models are built with ``use_cache=False``: the KV cache they return otherwise is a model output shaped
# by the key/value heads, which keeps those heads (compressc never changes an output's shape).
_FAMILIES = {
    "bert": ("BertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100, num_labels=3), "BertModel", "BertForSequenceClassification", _ids),
    "distilbert": ("DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100, num_labels=3),
                   "DistilBertModel", "DistilBertForSequenceClassification", _ids),
    # GPT-2's LM head is tied to its token embedding (one tensor, two uses); its layers are Conv1D
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                                eos_token_id=0), "GPT2Model", "GPT2LMHeadModel", _ids),
    # grouped-query attention: 4 query heads share 2 key/value heads (8 share 4 in the task model, so
    # that 30% of its key/value groups rounds to one)
    "llama": ("LlamaConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=64),
              "LlamaModel", "LlamaForCausalLM", _ids),
    "t5": ("T5Config", dict(d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, vocab_size=100),
           "T5Model", "T5ForConditionalGeneration", _seq2seq),
    "vit": ("ViTConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=32, patch_size=8, num_labels=3), "ViTModel", "ViTForImageClassification", _image),
    "convnext": ("ConvNextConfig", dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_channels=3, num_labels=3),
                 "ConvNextModel", "ConvNextForImageClassification", _image),
}
_TASK_CONFIG = {"gpt2": dict(use_cache=False), "llama": dict(use_cache=False, num_attention_heads=8, num_key_value_heads=4),
                "t5": dict(use_cache=False)}


class LogitsOnly(nn.Module):
    """A model returning only its ``logits``: T5ForConditionalGeneration also returns the encoder's
    hidden states, which would keep the hidden width (docs/transformers.md)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs).logits


def _build(family: str, task: bool) -> Example:
    import transformers

    config_cls, config, base, head, inputs = _FAMILIES[family]
    config = {**config, **(_TASK_CONFIG.get(family, {}) if task else {})}
    torch.manual_seed(0)
    model = getattr(transformers, head if task else base)(getattr(transformers, config_cls)(**config)).eval()
    return model, inputs()


def _t5_logits() -> Example:
    model, inputs = _build("t5", task=True)
    return LogitsOnly(model).eval(), inputs


HF_MODELS: dict[str, Callable[[], Example]] = {name: partial(_build, name, False) for name in _FAMILIES}
HF_TASK_MODELS: dict[str, Callable[[], Example]] = {
    **{name: partial(_build, name, True) for name in _FAMILIES}, "t5": _t5_logits}
HF_TASK_MODELS["t5_all_outputs"] = partial(_build, "t5", True)  # logits and the encoder's hidden states
