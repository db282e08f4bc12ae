"""search_cost.flops_per_token against torch's own FLOP counter on a small BERT: forward, and
forward + backward with the MLM head (a backward pass costs two forwards)."""
import pytest
import torch


@pytest.mark.parametrize("seq_len", [16, 40])
def test_flops_per_token_matches_torch_flop_counter(seq_len):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from tamt_ds.search_cost import FORWARDS, flops_per_token, forward_flops_per_token

    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
                     max_position_embeddings=64, attn_implementation="eager")
    batch, tokens = 3, 3 * seq_len
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))

    backbone = BertModel(cfg, add_pooling_layer=False).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backbone(input_ids=ids)
    assert counter.get_total_flops() == pytest.approx(tokens * forward_flops_per_token(cfg, seq_len, with_mlm_head=False),
                                                      rel=1e-9)

    mlm = BertForMaskedLM(cfg).train()
    with FlopCounterMode(display=False) as counter:
        mlm(input_ids=ids, labels=ids).loss.backward()
    assert FORWARDS["mlm"] == FORWARDS["imp"] == 3
    assert counter.get_total_flops() == pytest.approx(tokens * flops_per_token(cfg, seq_len, "mlm"), rel=0.01)
    assert flops_per_token(cfg, seq_len, "kd") == 4 * forward_flops_per_token(cfg, seq_len, with_mlm_head=False)
