import pytest
import torch.nn as nn

from laet_fast import find_layers
from tiny_models import TINY_CONFIGS, tiny_model

EXPECTED = {
    "llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gemma": "model.layers",
    "phi3": "model.layers", "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers", "falcon": "transformer.h", "bert": "bert.encoder.layer",
}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("head", ["causal", "seqcls"])
def test_find_layers_every_architecture(arch, head):
    model = tiny_model(arch, head=head)
    stack = find_layers(model)
    assert len(stack) == 3
    assert stack.path == EXPECTED[arch]
    assert stack.names[0] == EXPECTED[arch] + ".0"
    assert model.get_submodule(stack.path) is stack.blocks


def test_find_layers_under_peft():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    stack = find_layers(wrapped)
    assert stack.path == "base_model.model.model.layers"
    assert wrapped.get_submodule(stack.path) is stack.blocks


def test_unsupported_model_names_class_and_fix():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stuff = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"Odd.*layers='model.layers'"):
        find_layers(Odd())


def test_explicit_path():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Module()
            self.trunk.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])

    stack = find_layers(Custom(), layers="trunk.blocks")
    assert len(stack) == 4 and stack.path == "trunk.blocks"
    with pytest.raises(ValueError, match="does not name"):
        find_layers(Custom(), layers="trunk.nothing")
