"""The profiler on the real SmolLM2-135M: two blocks, two bit widths, 256 tokens."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autocompress.data import Split, load_tokens
from autocompress.profile import ProfileSettings, profile_model
from autocompress.profile.sensitivity import trace_model
from autocompress.compress.apply import compress_block
from autocompress.compress.calibrate import token_batch
from autocompress.search.space import space_from_dict

pytestmark = pytest.mark.real


def test_profile_of_first_and_last_block(smollm2):
    space = space_from_dict({"name": "real-smoke", "bits": [2, 8, 16], "group_size": 128,
                             "frozen": [r"re:model\.layers\.([1-9]|1[0-9]|2[0-8])"]})
    stream = load_tokens("stdlib-docs", smollm2.tokenizer, Split.CALIBRATION, 256)
    profile = profile_model(smollm2, stream, space, ProfileSettings(tokens=256, seq_len=256, roles=False,
                                                                    proxies=False, progress=False))
    assert [u.name for u in profile.units] == ["model.layers.0", "model.layers.29"]
    assert 1.5 < profile.base_loss < 4.0
    for unit in profile.units:
        assert unit.kl["bits=2"] > 10 * unit.kl["bits=8"] > 0
        assert unit.loss_delta["bits=2"] > 0
    two = {a.bits: a for a in profile.additivity}[2]
    assert two.predicted_kl == pytest.approx(sum(u.kl["bits=2"] for u in profile.units))
    assert two.measured_kl > 0


def test_suffix_rerun_matches_a_full_forward_on_the_real_model(smollm2):
    model = smollm2.model
    rows = token_batch(load_tokens("stdlib-docs", smollm2.tokenizer, Split.CALIBRATION, 256).tokens, 256)
    trace = trace_model(model, rows)
    blocks = trace.blocks
    changed = compress_block(blocks[29], 29, model, space_from_dict({"name": "x", "bits": [3, 16]}).quant_choice(3))
    kl, _ = trace.measure_block(29, changed)
    original = blocks[29]
    with torch.no_grad():
        ref = F.log_softmax(model(input_ids=rows, use_cache=False).logits[:, :-1], -1)
        blocks[29] = changed
        try:
            new = F.log_softmax(model(input_ids=rows, use_cache=False).logits[:, :-1], -1)
        finally:
            blocks[29] = original
    full = float((ref.exp() * (ref - new)).sum(-1).mean())
    assert kl == pytest.approx(full, rel=1e-3, abs=1e-5)
