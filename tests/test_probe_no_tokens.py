"""A LayerProbe that saw no tokens says so instead of handing back a silent table of NaN."""
import math
import warnings

import pytest
import torch

from tiny_models import random_batch, tiny_model

from laet_fast import LayerProbe


def test_no_forward_pass_warns():
    model = tiny_model("llama", seed=0)
    with LayerProbe(model) as probe:
        pass
    with pytest.warns(UserWarning, match="the probe saw no tokens"):
        scores = probe.scores()
    assert scores.num_tokens == 0 and all(math.isnan(v) for v in scores["block_influence"])


def test_all_padding_warns_and_real_tokens_do_not():
    model = tiny_model("llama", seed=0)
    ids, mask = random_batch(211, generator=torch.Generator().manual_seed(0))
    with LayerProbe(model) as probe, torch.no_grad():
        model(input_ids=ids, attention_mask=torch.zeros_like(mask))
    with pytest.warns(UserWarning, match="every attention_mask entry was 0"):
        probe.scores()
    with LayerProbe(model) as probe, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert probe.scores().num_tokens == int(mask.sum())
