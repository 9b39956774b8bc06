"""Tiny Hugging Face ``transformers`` models of seven families, built from configs (random weights,
nothing downloaded). Each builder returns ``(model, example_inputs)`` like ``tests/models.py``; none of
these root ``forward`` methods is traceable by torch.fx (they take ``**kwargs``), so compressc traces
them with its torch.export frontend. ``transformers`` is imported only when a builder runs."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["HF_MODELS"]

Example = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def _image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _build(make: Callable[[Any], nn.Module], *inputs: torch.Tensor) -> Example:
    import transformers

    torch.manual_seed(0)
    return make(transformers).eval(), inputs


def bert() -> Example:
    return _build(lambda t: t.BertModel(t.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100)), _ids())


def distilbert() -> Example:
    return _build(lambda t: t.DistilBertModel(t.DistilBertConfig(
        dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=100)), _ids())


def gpt2() -> Example:  # returns a DynamicCache (past_key_values) next to the hidden states
    return _build(lambda t: t.GPT2Model(t.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)), _ids())


def llama() -> Example:  # grouped-query attention: 4 query heads share 2 key/value heads
    return _build(lambda t: t.LlamaModel(t.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64)), _ids())


def t5() -> Example:  # encoder-decoder: forward(input_ids, attention_mask, decoder_input_ids)
    ids = _ids()
    return _build(lambda t: t.T5Model(t.T5Config(
        d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, vocab_size=100)), ids, torch.ones_like(ids), ids)


def vit() -> Example:
    return _build(lambda t: t.ViTModel(t.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8)), _image())


def convnext() -> Example:
    return _build(lambda t: t.ConvNextModel(t.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_channels=3)), _image())


HF_MODELS: dict[str, Callable[[], Example]] = {
    "bert": bert, "distilbert": distilbert, "gpt2": gpt2, "llama": llama, "t5": t5, "vit": vit, "convnext": convnext,
}
