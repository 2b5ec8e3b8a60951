"""apply_selection / suspend_backward_cut / export_model / build_optimizer on tiny random models (CPU)."""
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from tiny_models import random_batch, tiny_model

import laet_fast
from laet_fast import Selection, apply_selection, build_optimizer, export_model, find_layers, suspend_backward_cut
from laet_fast.quantize import quant_mode, quant_modes, quant_state_tensors

warnings.filterwarnings("ignore", message="MatMul8bitLt")

VOCAB = 211
ARCHS = ["llama", "gpt2", "gpt_neox"]  # gpt2: Conv1D layers; gpt_neox: fused qkv Linear, another block path


def _model(arch, head="causal", layers=4, seed=0):
    depth = {"n_layer": layers} if arch == "gpt2" else {"num_hidden_layers": layers}
    return tiny_model(arch, head=head, seed=seed, **depth)


def _batch(seed=0):
    return random_batch(VOCAB, generator=torch.Generator().manual_seed(seed))


def _loss(model, seed=0):
    ids, mask = _batch(seed)
    if hasattr(model, "score") or hasattr(model, "classifier"):
        logits = model(input_ids=ids, attention_mask=mask).logits
        return nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1, 2]))
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def _real_nbytes(model):
    """Bytes held by the model: every distinct storage of its parameters, buffers and bnb quantization state."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for m in model.modules() for t in quant_state_tensors(m)]
    storages = {}
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _block_of(name, path):
    if not name.startswith(path + "."):
        return None
    return int(name[len(path) + 1:].split(".")[0])


@pytest.mark.parametrize("arch", ARCHS + ["bert"])
def test_selected_trainable_rest_frozen(arch):
    model = _model(arch, head="seqcls")
    report = apply_selection(model, [1, 3])
    path = find_layers(model).path
    head = "classifier" if arch == "bert" else "score"
    for name, param in model.named_parameters():
        block = _block_of(name, path)
        if block is not None:
            assert param.requires_grad == (block in (1, 3)), name
        elif name.startswith(head + "."):
            assert param.requires_grad, name
        else:  # embeddings, final norm, pooler
            assert not param.requires_grad, name
        assert param.dtype == torch.float32
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.groups["task head"][1] > 0 and report.groups["embeddings"][1] > 0
    text = str(report)
    for group in ("embeddings", "trained blocks", "frozen blocks", "norm/head", "task head", "trainable parameters"):
        assert group in text


def test_train_extra_and_dtype():
    model = _model("llama")
    report = apply_selection(model, [2], train_extra=("model.norm",), dtype=torch.bfloat16)
    assert model.model.norm.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert report.dtype == torch.bfloat16
    loss = _loss(model)
    loss.backward()
    assert model.model.layers[2].mlp.up_proj.weight.grad.dtype == torch.bfloat16
    assert model.model.norm.weight.grad is not None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_frozen_blocks(arch, mode):
    model = _model(arch)
    ids, mask = _batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    report = apply_selection(model, [2], quantize_frozen=mode)
    stack = find_layers(model)
    for index, block in enumerate(stack):
        linears = [m for m in block.modules() if quant_mode(m) is None
                   and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
        quantized = [m for m in block.modules() if quant_mode(m) is not None]
        if index == 2:
            assert linears and not quantized
        else:  # every linear layer (GPT-2's Conv1D included) became a bitsandbytes layer
            assert quantized and not linears and {quant_mode(m) for m in quantized} == {mode}
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    rel = (got - expected)[valid].norm() / expected[valid].norm()
    assert 0 < rel < (0.25 if mode == "nf4" else 0.03)
    before, after = report.groups["frozen blocks"]
    assert after < before * (0.4 if mode == "nf4" else 0.5)
    assert report.groups["trained blocks"][0] == report.groups["trained blocks"][1]


@pytest.mark.parametrize("arch,mode", [("llama", None), ("llama", "nf4"), ("gpt2", "int8")])
def test_report_bytes_match_model(arch, mode):
    model = _model(arch, head="seqcls")
    real_before = _real_nbytes(model)
    total_params = sum(p.numel() for p in model.parameters())
    report = apply_selection(model, [0, 2], quantize_frozen=mode)
    assert report.total_params == total_params  # 4-bit weights count as the matrices they stand for
    assert report.bytes_before == real_before
    assert report.bytes_after == _real_nbytes(model)
    if mode is not None:
        assert report.bytes_after < report.bytes_before


def _track_block_grads(model):
    """Tensor hooks on every block output: the set of blocks the backward pass reaches, and forward grad flags."""
    reached, output_requires_grad = set(), {}

    def hook(index):
        def record(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            output_requires_grad[index] = hidden.requires_grad
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: reached.add(index))

        return record

    for index, block in enumerate(find_layers(model)):
        block.register_forward_hook(hook(index))
    return reached, output_requires_grad


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_backward_cut(arch, checkpointing):
    model = _model(arch)
    apply_selection(model, [2, 3])
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()  # the embedding output now requires grad
    reached, requires_grad = _track_block_grads(model)
    _loss(model).backward()
    assert reached == {2, 3}
    assert requires_grad == {0: False, 1: False, 2: True, 3: True}  # no graph, so no saved activations, below 2
    stack = find_layers(model)
    for index, block in enumerate(stack):
        has_grad = [p.grad is not None for p in block.parameters()]
        assert all(has_grad) if index >= 2 else not any(has_grad)

    # Suspended, gradients reach the frozen blocks below (the gradient-norm recorder relies on it).
    model.zero_grad()
    reached.clear()
    with suspend_backward_cut(model):
        _loss(model).backward()
    assert reached == ({0, 1, 2, 3} if checkpointing else {2, 3})  # below 2 only if the input requires grad
    reached.clear()
    _loss(model).backward()
    assert reached == {2, 3}


def test_backward_cut_lowest_block_zero_and_empty():
    model = _model("llama")
    model.train()
    model.enable_input_require_grads()
    reached, _ = _track_block_grads(model)

    def embedding_output_hook(module, args, output):
        output.register_hook(lambda grad: reached.add("embeddings"))

    model.model.embed_tokens.register_forward_hook(embedding_output_hook)
    apply_selection(model, [0])
    _loss(model).backward()
    assert reached == {0, 1, 2, 3}  # the blocks above the selected one carry its gradient, nothing below
    model = _model("llama", head="seqcls")
    model.enable_input_require_grads()
    reached, requires_grad = _track_block_grads(model)
    with pytest.warns(UserWarning, match="the selection is empty, so all 4 blocks are frozen"):
        apply_selection(model, Selection((), num_layers=4))
    _loss(model).backward()
    assert reached == set() and not any(requires_grad.values())
    assert model.score.weight.grad is not None


@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_changes_only_selected(arch):
    model = _model(arch, head="seqcls")
    apply_selection(model, [1, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, lr=1e-2)
    model.train()
    _loss(model).backward()
    optimizer.step()
    path = find_layers(model).path
    for name, value in model.state_dict().items():
        block = _block_of(name, path)
        trained = block in (1, 2) or name.startswith("score.")
        if trained and value.is_floating_point() and "bias" not in name and value.dim() > 1:
            assert not torch.equal(value, before[name]), name
        elif not trained:
            assert torch.equal(value, before[name]), name


def _train(model, steps, seed=0):
    optimizer = build_optimizer(model, lr=1e-2)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        _loss(model, seed + step).backward()
        optimizer.step()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reapply_moves_selection_and_never_requantizes_trained(arch):
    model = _model(arch)
    stack = find_layers(model)
    apply_selection(model, [1, 3], quantize_frozen="nf4")
    _train(model, 3)
    trained = {k: v.clone() for k, v in stack[1].state_dict().items()}
    trained_types = {name: type(m) for name, m in stack[1].named_modules()}

    # Block 1 leaves, block 0 (quantized until now) joins.
    report = apply_selection(model, Selection((0, 3), num_layers=4))
    assert report.quantize == "nf4"
    assert quant_modes(stack[0]) == set() and quant_modes(stack[1]) == set()
    assert quant_modes(stack[2]) == {"nf4"}
    assert all(p.requires_grad for p in stack[0].parameters())
    assert not any(p.requires_grad for p in stack[1].parameters())
    assert {name: type(m) for name, m in stack[1].named_modules()} == trained_types
    for key, value in stack[1].state_dict().items():
        assert torch.equal(value, trained[key]), key  # bit for bit

    # The cut moved down to block 0, and training the new selection leaves block 1 alone.
    reached, _ = _track_block_grads(model)
    _train(model, 1, seed=7)
    assert reached == {0, 1, 2, 3}
    for key, value in stack[1].state_dict().items():
        assert torch.equal(value, trained[key]), key

    # Moving up again: blocks 0 and 1 stay full precision (both were trained), the cut moves to 3.
    apply_selection(model, [3])
    assert quant_modes(stack[0]) == set() and quant_modes(stack[1]) == set()
    reached.clear()
    _train(model, 1)
    assert reached == {3}
    for key, value in stack[1].state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.parametrize("arch,mode", [("llama", "nf4"), ("gpt2", "int8")])
def test_export_save_reload(arch, mode, tmp_path):
    import transformers

    model = _model(arch)
    apply_selection(model, [2], quantize_frozen=mode)
    _train(model, 2)
    model.eval()
    ids, mask = _batch(3)
    with torch.no_grad():
        quantized_logits = model(input_ids=ids, attention_mask=mask).logits
    exported = export_model(model)
    assert exported is model and not hasattr(model, "_laet_fast")
    assert quant_modes(model) == set()
    assert all(not block._forward_pre_hooks for block in find_layers(model))
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    # Dequantized weights are the ones the quantized layers computed with (int8 also rounds activations).
    tol = 0.05 if mode == "int8" else 1e-4
    torch.testing.assert_close(logits[valid], quantized_logits[valid], atol=tol, rtol=tol)

    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(reloaded_logits[valid], logits[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_optimizer_covers_exactly_trainable(name):
    model = _model("llama", head="seqcls")
    apply_selection(model, [1, 2], quantize_frozen="nf4")
    try:
        optimizer = build_optimizer(model, name=name, lr=1e-3, weight_decay=0.1)
    except (RuntimeError, NotImplementedError) as error:  # pragma: no cover - depends on the bnb backend
        pytest.skip(f"{name} is not available on this bitsandbytes backend: {error}")
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(in_optimizer) == len({id(p) for p in in_optimizer})
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        assert group["weight_decay"] == (0.1 if group["params"][0].dim() >= 2 else 0.0)
    expected = {"adamw": torch.optim.AdamW}.get(name)
    if expected is None:
        import bitsandbytes as bnb

        expected = bnb.optim.AdamW8bit
    assert isinstance(optimizer, expected)
    weight = model.model.layers[1].mlp.down_proj.weight
    start = weight.detach().clone()
    try:
        model.train()
        _loss(model).backward()
        optimizer.step()
    except (RuntimeError, NotImplementedError) as error:  # pragma: no cover - depends on the bnb backend
        pytest.skip(f"{name} cannot step on this bitsandbytes backend: {error}")
    assert not torch.equal(weight, start)


def test_bad_selection_refused():
    model = _model("llama")
    with pytest.raises(ValueError, match="made for a model with 6 layers, but the model has 4"):
        apply_selection(model, Selection((1,), num_layers=6))
    with pytest.raises(ValueError, match=r"out of range for a model with 4 layers"):
        apply_selection(model, [1, 4])
    with pytest.raises(ValueError, match="quantize_frozen: Unknown quantization 'int4'"):
        apply_selection(model, [1], quantize_frozen="int4")
    with pytest.raises(ValueError, match="not a module"):
        apply_selection(model, [1], train_extra=("model.nope",))
    assert not hasattr(model, "_laet_fast")  # nothing was applied by the refused calls
    assert all(p.requires_grad for p in model.parameters())


def test_mixed_quantization_refused():
    model = _model("llama")
    apply_selection(model, [3], quantize_frozen="nf4")
    with pytest.raises(ValueError, match="already quantized as 'nf4'"):
        apply_selection(model, [2], quantize_frozen="int8")
    with pytest.raises(ValueError, match="dtype"):
        apply_selection(model, [2], dtype=torch.bfloat16)
    apply_selection(model, [2], quantize_frozen="nf4")  # the same format is fine

    # A model holding int8 layers from elsewhere (e.g. loaded quantized) is refused 4-bit.
    other = _model("llama")
    from laet_fast.quantize import quantize_linears

    quantize_linears(other.model.layers[0], "int8", compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="already holds int8"):
        apply_selection(other, [2], quantize_frozen="nf4")


def test_missing_bitsandbytes(monkeypatch):
    model = _model("llama")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        apply_selection(model, [1], quantize_frozen="nf4")
    apply_selection(model, [1])  # no quantization needs no bitsandbytes
    assert isinstance(build_optimizer(model), torch.optim.AdamW)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build_optimizer(model, name="adamw8bit")
    with pytest.raises(ValueError, match="adamw, adamw8bit"):
        build_optimizer(model, name="sgd")


def test_exports():
    assert laet_fast.suspend_backward_cut is suspend_backward_cut
    assert "suspend_backward_cut" in laet_fast.__all__


def test_trained_embeddings_disable_the_backward_cut():
    """train_extra naming the embeddings: the backward pass must reach them through every block."""
    from tiny_models import random_batch, tiny_model
    from laet_fast import apply_selection

    model = tiny_model("llama", seed=3)
    apply_selection(model, [2], train_extra=["model.embed_tokens"])
    ids, mask = random_batch(model.config.vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.layers[0].parameters())


def test_trained_tied_lm_head_disables_the_backward_cut():
    """train_extra=["lm_head"] with the head tied to the token embeddings (SmolLM2, Gemma...): that weight
    is also the embedding, so its gradient must include the input side, which the cut would drop."""
    model = _model("llama", seed=5)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = _model("llama", seed=5)
    reference.config.tie_word_embeddings = True
    reference.tie_weights()
    reference.requires_grad_(False)
    reference.lm_head.weight.requires_grad_(True)
    reference.model.layers[2].requires_grad_(True)
    _loss(reference).backward()

    apply_selection(model, [2], train_extra=["lm_head"], dtype=torch.float32)
    _loss(model).backward()
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_trained_input_projection_below_the_blocks_gets_its_gradient():
    """OPT's `project_in` runs below the blocks and has no embedding in its name: the cut must
    still let the backward pass through to it when it is trained."""
    from tiny_models import random_batch, tiny_model
    from laet_fast import apply_selection

    model = tiny_model("opt", seed=4, word_embed_proj_dim=40)
    assert model.model.decoder.project_in is not None
    apply_selection(model, [2], train_extra=["model.decoder.project_in"])
    ids, mask = random_batch(model.config.vocab_size)
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    grad = model.model.decoder.project_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.decoder.layers[0].parameters())


def test_frozen_embeddings_keep_the_cut_under_enable_input_require_grads():
    """enable_input_require_grads makes the embedding output require grad without any trained
    parameter below the blocks: the cut stays, and no block below the lowest sees a gradient."""
    from tiny_models import random_batch, tiny_model
    from laet_fast import apply_selection

    model = tiny_model("llama", seed=6)
    model.enable_input_require_grads()
    apply_selection(model, [2])
    seen = []
    for index, block in enumerate(model.model.layers):
        block.register_full_backward_hook(lambda module, gin, gout, index=index: seen.append(index))
    ids, mask = random_batch(model.config.vocab_size)
    model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    assert seen == [2]


@pytest.mark.parametrize("spelling,mode", [("NF4", "nf4"), (" Int8 ", "int8"), ("none", None), ("None", None),
                                           ("NONE", None)])
def test_quantize_frozen_spellings_match_the_command_line(spelling, mode):
    model = _model("llama")
    report = apply_selection(model, [3], quantize_frozen=spelling)
    assert report.quantize == mode and quant_modes(find_layers(model)[0]) == ({mode} if mode else set())


def test_empty_selection_warns():
    model = _model("llama")
    with pytest.warns(UserWarning, match="apply_selection: the selection is empty"):
        apply_selection(model, [])
    assert not any(p.requires_grad for p in model.parameters())


def test_export_to_a_folder_is_a_complete_transformers_model(tmp_path):
    """export_model(model, path, tokenizer=...) writes weights, config and tokenizer: loading and
    scoring the folder again works (the README's export could not be scored before)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from laet_fast import cli
    from laet_fast.loading import load_model_and_tokenizer

    words = ["[UNK]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 2)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    model = _model("llama")
    apply_selection(model, [2], quantize_frozen="nf4")
    export_model(model, str(tmp_path / "out"), tokenizer=tokenizer)
    reloaded, reloaded_tokenizer = load_model_and_tokenizer(str(tmp_path / "out"), device="cpu")
    assert reloaded_tokenizer("w3 w7")["input_ids"] == tokenizer("w3 w7")["input_ids"]
    ids, mask = _batch(4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)
    data = tmp_path / "d.txt"
    data.write_text("w1 w2 w3\nw4 w5\n")
    assert cli.main(["score", "--model", str(tmp_path / "out"), "--data", str(data), "--device", "cpu"]) == 0
    with pytest.warns(UserWarning, match="no tokenizer given"):
        export_model(_model("llama"), str(tmp_path / "bare"))
    assert os.path.isfile(tmp_path / "bare" / "config.json")
