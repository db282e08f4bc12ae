"""A checkpoint of host-resident fp32 state copies nothing: views of ZeRO's flat partition, written
once by torch.save (the real engine's save and resume run in tests/test_search_e2e.py)."""
import io

import torch

from tamt_ds import checkpoint


def test_host_fp32_state_is_saved_as_views_written_once():
    flat = torch.randn(1000)  # a ZeRO flat partition: every trainable parameter's slice, back to back
    views = {i: checkpoint._cpu(flat[i * 100:], 100) for i in range(10)}
    assert all(v.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for v in views.values())
    buf = io.BytesIO()
    torch.save(views, buf)
    assert len(buf.getvalue()) < flat.numel() * 4 * 1.5  # the flat buffer once, not once per view
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert all(torch.equal(loaded[i], flat[i * 100:(i + 1) * 100]) for i in range(10))


def test_other_state_is_copied_to_fp32_on_the_host():
    half = torch.randn(300).bfloat16()
    out = checkpoint._cpu(half[100:], 100)
    assert out.dtype == torch.float32 and out.untyped_storage().nbytes() == 100 * 4
    assert torch.equal(out, half[100:200].float())
