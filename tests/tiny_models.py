"""Tiny transformers models with random weights, one per supported architecture, for the tests."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny matrices: one thread is faster than two on a shared CPU, where idle-spinning threads wait.

    A test module opts in with ``from tiny_models import one_thread`` and
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Small configs with random weights, one per supported architecture. Sizes are odd on purpose
# (hidden sizes that are not powers of two) and tiny so that the interpreter stays fast.
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(hidden_size=72, intermediate_size=136, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=211)),
    "qwen2": ("Qwen2Config", dict(hidden_size=72, intermediate_size=136, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=211)),
    "mistral": ("MistralConfig", dict(hidden_size=72, intermediate_size=136, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=211)),
    "gemma": ("GemmaConfig", dict(hidden_size=72, intermediate_size=136, num_hidden_layers=3, head_dim=18,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=211)),
    "phi3": ("Phi3Config", dict(hidden_size=72, intermediate_size=136, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=211, pad_token_id=0)),
    "gpt2": ("GPT2Config", dict(n_embd=72, n_layer=3, n_head=4, vocab_size=211, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=72, intermediate_size=136, num_hidden_layers=3,
                                       num_attention_heads=4, vocab_size=211)),
    "opt": ("OPTConfig", dict(hidden_size=72, ffn_dim=136, num_hidden_layers=3, num_attention_heads=4,
                              vocab_size=211, word_embed_proj_dim=72, max_position_embeddings=64)),
    "falcon": ("FalconConfig", dict(hidden_size=72, num_hidden_layers=3, num_attention_heads=4,
                                    vocab_size=211, new_decoder_architecture=False, multi_query=True)),
    "bert": ("BertConfig", dict(hidden_size=72, intermediate_size=136, num_hidden_layers=3,
                                num_attention_heads=4, vocab_size=211, max_position_embeddings=64)),
}
CAUSAL_ARCHS = [a for a in TINY_CONFIGS if a != "bert"]


def tiny_config(arch: str, **overrides):
    import transformers

    cls_name, kwargs = TINY_CONFIGS[arch]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    return config


def tiny_model(arch: str, head: str = "causal", dtype=torch.float32, seed: int | None = None, **overrides):
    """A randomly initialised tiny model: ``head`` is "causal", "seqcls" or "base"."""
    import transformers

    config = tiny_config(arch, **overrides)
    config._attn_implementation = "eager"
    if head == "seqcls":
        config.num_labels = 3
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
        cls = transformers.AutoModelForSequenceClassification
    elif head == "causal":
        cls = transformers.AutoModelForCausalLM if arch != "bert" else transformers.AutoModelForMaskedLM
    else:
        cls = transformers.AutoModel
    if seed is not None:
        torch.manual_seed(seed)
    model = cls.from_config(config, dtype=dtype)
    return model.eval()


PAD_SIDES = ("right", "left")


def random_batch(vocab_size: int, batch: int = 3, seq: int = 11, pad: bool = True, generator=None,
                 side: str = "right"):
    """Random token ids and an attention mask padding each row but the first by a different length,
    on the ``side`` given ("right" or "left", as a tokenizer's ``padding_side``)."""
    if side not in PAD_SIDES:
        raise ValueError(f"side must be one of {PAD_SIDES}, got {side!r}")
    ids = torch.randint(1, vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for row in range(1, batch):
            if side == "right":
                mask[row, seq - 2 * row:] = 0
            else:
                mask[row, :2 * row] = 0
    return ids, mask
