"""laet_fast.to_peft_config: LoRA adapters land on the selected blocks only (Llama and GPT-2)."""
import re

import pytest
import torch

from laet_fast import Selection
from laet_fast.integrations.peft_bridge import block_linear_names, to_peft_config
from tiny_models import tiny_model

peft = pytest.importorskip("peft")


def _adapted(peft_model):
    """{(block index, module name)} of the modules that got a LoRA adapter."""
    found = set()
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and len(lora_a):
            match = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
            found.add((int(match.group(1)) if match else None, name.rsplit(".", 1)[-1]))
    return found


@pytest.mark.parametrize("arch,default_targets,all_linear", [
    ("llama", {"q_proj", "v_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("gpt2", {"c_attn"}, {"c_attn", "c_proj", "c_fc"}),
])
@pytest.mark.parametrize("targets", ["default", "all-linear", "listed"])
def test_adapters_sit_on_the_selected_blocks_only(arch, default_targets, all_linear, targets):
    model = tiny_model(arch, seed=0, num_hidden_layers=4) if arch == "llama" else tiny_model(arch, seed=0, n_layer=4)
    selection = Selection(layers=(1, 3), num_layers=4)
    if targets == "default":
        config, want_names = to_peft_config(selection, model=model), default_targets
    elif targets == "all-linear":
        config = to_peft_config(selection, r=4, alpha=8, target_modules="all-linear", model=model)
        want_names = all_linear
    else:  # no model: PEFT finds the block index in the module paths by itself
        want_names = sorted(default_targets)[:1]
        config = to_peft_config(selection, target_modules=want_names)
        want_names = set(want_names)
    assert config.layers_to_transform == [1, 3]
    peft_model = peft.get_peft_model(model, config)
    assert _adapted(peft_model) == {(block, name) for block in (1, 3) for name in want_names}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    ids = torch.randint(0, 211, (2, 7), generator=torch.Generator().manual_seed(1))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in peft_model.named_parameters()
               if p.requires_grad)


def test_config_fields_and_pattern():
    model = tiny_model("gpt2", seed=0)
    config = to_peft_config(Selection(layers=(2, 0), num_layers=3), r=16, alpha=32, model=model, lora_dropout=0.1)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.1)
    assert config.layers_to_transform == [0, 2] and config.layers_pattern == "h"
    llama = tiny_model("llama", seed=0)
    assert to_peft_config(Selection(layers=(1,), num_layers=3), model=llama).layers_pattern == "layers"
    assert to_peft_config(Selection(layers=(1,), num_layers=3), layers_pattern="blocks").layers_pattern == "blocks"
    assert block_linear_names(llama) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_bad_input_is_refused_with_the_fix():
    model = tiny_model("llama", seed=0)
    with pytest.raises(ValueError, match="empty.*every block"):
        to_peft_config(Selection(layers=(), num_layers=3), model=model)
    with pytest.raises(ValueError, match="made for a model with 5 layers"):
        to_peft_config(Selection(layers=(1,), num_layers=5), model=model)
    with pytest.raises(ValueError, match="regular expression"):
        to_peft_config(Selection(layers=(1,), num_layers=3), target_modules=r".*q_proj")
    with pytest.raises(ValueError, match="needs model="):
        to_peft_config(Selection(layers=(1,), num_layers=3), target_modules="all-linear")
