"""A BERT / RoBERTa with fewer attention heads per layer: the model code of a compact_model/.

Copied next to a compact model's weights as modeling_tamt_compact.py and named in its
config's auto_map, so that plain transformers loads it:
    AutoModel.from_pretrained("compact_model", trust_remote_code=True)
transformers 5 dropped prune_heads / config.pruned_heads, and a config alone cannot say
"layer i keeps h_i heads of size hidden / num_attention_heads"; this file adds just that
(`tamt_heads_per_layer`).  The smaller FFN is the plain config's intermediate_size.
Standalone on purpose: it imports nothing but torch and transformers.
"""
from torch import nn
from transformers import BertModel, RobertaModel


class NoHeads(nn.Module):
    """Self-attention of a layer whose heads were all pruned: an empty context."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def shrink_attention(model, heads_per_layer):
    config = model.config
    head_size = config.hidden_size // config.num_attention_heads
    for layer, heads in zip(model.encoder.layer, heads_per_layer):
        width = heads * head_size
        attention = layer.attention
        if heads == 0:
            attention.self = NoHeads()
        else:
            for name in ("query", "key", "value"):
                setattr(attention.self, name, nn.Linear(config.hidden_size, width))
            attention.self.num_attention_heads = heads  # read by older transformers' attention
            attention.self.all_head_size = width
        attention.output.dense = nn.Linear(width, config.hidden_size)


class TamtCompactBertModel(BertModel):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        shrink_attention(self, config.tamt_heads_per_layer)
        self.post_init()


class TamtCompactRobertaModel(RobertaModel):
    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        shrink_attention(self, config.tamt_heads_per_layer)
        self.post_init()


__all__ = ["TamtCompactBertModel", "TamtCompactRobertaModel"]
