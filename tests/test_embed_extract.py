"""layer_embeddings: pooled block outputs against output_hidden_states, order, batching, padding, early stop."""
import numpy as np
import pytest
import torch

from merge_models import random_texts, save_tokenizer
from tiny_models import one_thread, tiny_model  # noqa: F401 (one_thread: a fixture)

from laet_fast.embed import LayerEmbeddings, layer_embeddings


pytestmark = pytest.mark.usefixtures("one_thread")


def load_tiny(arch, seed=0):
    return tiny_model(arch, head="base" if arch == "bert" else "causal", seed=seed)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    return AutoTokenizer.from_pretrained(str(folder))


def pooled_by_hand(hidden, mask, mode):
    """Pool [B, T, H] over each row's real tokens by indexing, in float64."""
    rows = []
    for b in range(hidden.shape[0]):
        tokens = hidden[b][mask[b].bool()].double()
        rows.append(tokens.mean(0) if mode == "mean" else tokens[-1] if mode == "last" else tokens[0])
    return torch.stack(rows)


def backbone(model):
    return model if type(model).__name__ == "BertModel" else model.base_model


def padded_batch(vocab, side, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 10), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 1, 6)):
        if pad:
            if side == "right":
                mask[row, 10 - pad:] = 0
            else:
                mask[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("arch, mode", [("llama", "mean"), ("llama", "last"), ("gpt2", "mean"), ("gpt2", "first"),
                                        ("bert", "first"), ("bert", "last")])
def test_block_i_is_hidden_states_i_plus_1_and_last_entry_has_the_final_norm(arch, mode):
    model = load_tiny(arch)
    ids, mask = padded_batch(model.config.vocab_size, "right", seed=1)
    batch = [{"input_ids": ids, "attention_mask": mask}]
    got = layer_embeddings(model, batch, pooling=mode, progress=False)
    assert got.dtype == torch.float32 and got.shape == (4, 3, model.config.hidden_size)

    captured = {}
    last_block = {"llama": model.model.layers if arch == "llama" else None,
                  "gpt2": model.transformer.h if arch == "gpt2" else None,
                  "bert": model.encoder.layer if arch == "bert" else None}[arch][-1]
    handle = last_block.register_forward_hook(lambda m, a, out: captured.update(out=out[0] if isinstance(out, tuple)
                                                                               else out))
    with torch.no_grad():
        states = backbone(model)(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    handle.remove()
    assert len(states) == 4  # embeddings output + one per block
    for i in range(2):
        torch.testing.assert_close(got[:, i].double(), pooled_by_hand(states[i + 1], mask, mode), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, 2].double(), pooled_by_hand(captured["out"], mask, mode), rtol=1e-5, atol=1e-6)
    normed = layer_embeddings(model, batch, pooling=mode, final_norm=True, progress=False)
    torch.testing.assert_close(normed[:, 2].double(), pooled_by_hand(states[3], mask, mode), rtol=1e-5, atol=1e-6)
    if arch != "bert":  # decoders: the last hidden_states entry is not the last block's output
        assert not torch.allclose(got[:, 2], normed[:, 2], atol=1e-3)


@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_left_and_right_padding_give_the_same_embeddings(arch, tokenizer):
    model = load_tiny(arch)
    texts = random_texts(9, seed=3)
    results = []
    for side in ("right", "left"):
        tokenizer.padding_side = side
        results.append(layer_embeddings(model, texts, tokenizer=tokenizer, batch_size=4, progress=False))
    tokenizer.padding_side = "right"
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


def test_texts_come_back_in_input_order_and_do_not_depend_on_the_batch_size(tokenizer):
    model = load_tiny("llama")
    texts = random_texts(9, seed=5, min_words=1, max_words=14)
    one = layer_embeddings(model, texts, tokenizer=tokenizer, batch_size=1, progress=False)
    seven = layer_embeddings(model, texts, tokenizer=tokenizer, batch_size=7, progress=False)
    torch.testing.assert_close(one, seven, rtol=1e-4, atol=1e-5)
    for n in (0, 4, 8):  # each text alone, by hand, is row n
        encoded = tokenizer([texts[n]], return_tensors="pt")
        with torch.no_grad():
            states = model.model(**encoded, output_hidden_states=True).hidden_states
        torch.testing.assert_close(seven[n, 0].double(), states[1][0].double().mean(0), rtol=1e-4, atol=1e-5)


def test_blocks_above_the_highest_requested_layer_and_the_head_do_not_run():
    model = load_tiny("llama")
    calls = []
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    model.lm_head.register_forward_hook(lambda m, a, o: calls.append("head"))
    ids, mask = padded_batch(model.config.vocab_size, "right", seed=2)
    got = layer_embeddings(model, [{"input_ids": ids, "attention_mask": mask}], layers=[1, 0], progress=False)
    assert calls == [0, 1] and got.layers == (0, 1) and got.names == ("model.layers.0", "model.layers.1")
    calls.clear()
    layer_embeddings(model, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert calls == [0, 1, 2]  # even with every block, the LM head is skipped


def test_out_writes_a_memory_mapped_npy(tokenizer, tmp_path):
    model = load_tiny("gpt2")
    texts = random_texts(6, seed=8)
    in_memory = layer_embeddings(model, texts, tokenizer=tokenizer, batch_size=4, progress=False)
    path = tmp_path / "emb.npy"
    mapped = layer_embeddings(model, texts, tokenizer=tokenizer, batch_size=4, out=str(path), progress=False)
    assert isinstance(mapped, LayerEmbeddings) and mapped.fingerprint == in_memory.fingerprint
    torch.testing.assert_close(torch.from_numpy(np.load(path)), torch.as_tensor(in_memory))


def test_progress_bar_and_fingerprint(tokenizer, capsys):
    model = load_tiny("bert")
    texts = random_texts(5, seed=1)
    emb = layer_embeddings(model, texts, tokenizer=tokenizer, pooling="first", batch_size=2, progress=True)
    assert "layer embeddings" in capsys.readouterr().err
    assert emb.fingerprint.startswith("5:")
    other = layer_embeddings(model, texts[::-1], tokenizer=tokenizer, pooling="first", progress=False)
    assert other.fingerprint != emb.fingerprint
    sliced = emb[torch.randperm(5)]
    assert type(sliced) is torch.Tensor and not hasattr(sliced, "fingerprint")


def test_progress_bar_counts_the_rows_of_a_list_of_batches(capsys):
    """Pre-tokenized batches in a list (LAET's probe sweep passes them so) show a bar with its total."""
    model = load_tiny("llama")
    ids = torch.randint(0, 50, (7, 5))
    batches = [{"input_ids": ids[:4], "attention_mask": torch.ones_like(ids[:4])},
               {"input_ids": ids[4:], "attention_mask": torch.ones_like(ids[4:])}]
    layer_embeddings(model, batches, progress=True)
    assert "7/7" in capsys.readouterr().err


def test_bad_input_gives_one_clear_error(tokenizer):
    model = load_tiny("llama")
    texts = random_texts(3, seed=2)
    with pytest.raises(ValueError, match="no texts"):
        layer_embeddings(model, [], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        layer_embeddings(model, texts, tokenizer=tokenizer, pooling="max")
    with pytest.raises(ValueError, match="no tokenizer"):
        layer_embeddings(model, texts)
    with pytest.raises(ValueError, match="has no tokens"):
        layer_embeddings(model, texts + [""], tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match=r"layers=\[5\]"):
        layer_embeddings(model, texts, tokenizer=tokenizer, layers=[5])
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="out= needs a list of texts"):
        layer_embeddings(model, [batch], out="x.npy")
    with pytest.raises(ValueError, match="no batches"):
        layer_embeddings(model, iter([]), progress=False)
    with pytest.raises(ValueError, match="not finite"):
        layer_embeddings(model, [{"input_ids": batch["input_ids"],
                                  "attention_mask": torch.zeros(2, 3, dtype=torch.long)}],
                         progress=False)


@pytest.mark.slow
def test_gguf_loaded_smollm2_matches_output_hidden_states(monkeypatch):
    pytest.importorskip("gguf")
    from laet_fast.data import load_texts
    from laet_fast.loading import load_model_and_tokenizer

    monkeypatch.setenv("LAET_FAST_BACKEND", "torch")  # 30 full-size blocks: the interpreter would time Python
    model, tokenizer = load_model_and_tokenizer(None, device="cpu")
    texts = load_texts(None, limit=3)
    got = layer_embeddings(model, texts, tokenizer=tokenizer, max_length=24, layers=[0, 14, 29], final_norm=True,
                           progress=False)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        states = model.model(**encoded, output_hidden_states=True).hidden_states
    for column, block in enumerate((0, 14, 29)):
        torch.testing.assert_close(got[:, column].double(), pooled_by_hand(states[block + 1],
                                                                          encoded["attention_mask"], "mean"),
                                   rtol=1e-4, atol=1e-4)


def test_dotted_block_names_where_tensor_names_is_torchs_setter(monkeypatch):
    """Before torch 2.13, ``Tensor.names`` is the named-tensor setter, which refuses a name like
    ``model.layers.0``; LayerEmbeddings keeps its own ``names`` there too (simulated here on a newer torch)."""
    def named_tensor_setter(self, value):
        bad = [n for n in value if n is not None and not str(n).isidentifier()]
        if bad:
            raise RuntimeError(f"Invalid name: a valid identifier contains only digits, alphabetical characters "
                               f"and/or underscore and starts with a non-digit. got: '{bad[0]}'.")

    monkeypatch.setattr(torch.Tensor, "names", property(lambda self: (None,) * self.dim(), named_tensor_setter),
                        raising=False)
    emb = LayerEmbeddings(torch.zeros(2, 2, 3), fingerprint=None, layers=[0, 1],
                          names=["model.layers.0", "model.layers.1"], pooling="mean")
    assert emb.names == ("model.layers.0", "model.layers.1")
