"""attn_implementation="tessel" in real Hugging Face model classes built from
small configs (random weights, no downloads): GPT-2, Llama (GQA) and Mistral
(sliding window) give the logits and gradients of attn_implementation="sdpa"
on left- and right-padded batches, packed sequences and cached generation."""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tessel.integrations import huggingface  # noqa: E402

VOCAB = 97


def gpt2(attn_pdrop=0.0):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  attn_pdrop=attn_pdrop, resid_pdrop=0.0, embd_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def mistral():
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, sliding_window=5,
                                     max_position_embeddings=64)
    return transformers.MistralForCausalLM(cfg)


MODELS = {"gpt2": gpt2, "llama": llama, "mistral": mistral}


@pytest.fixture(scope="module", autouse=True)
def registered():
    huggingface.register()


def build(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().float()


def batch(padding, b=3, n=17, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, n), generator=gen)
    mask = torch.ones(b, n, dtype=torch.long)
    lengths = [n, n - 6, 4][:b]
    for i, length in enumerate(lengths):
        if padding == "right":
            mask[i, length:] = 0
        elif padding == "left":
            mask[i, :n - length] = 0
    return ids, mask


def step(model, impl, ids, mask):
    """Logits and the gradients of a language-model loss over the real tokens."""
    model.set_attn_implementation(impl)
    model.zero_grad()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_logits_and_gradients_match_sdpa(name, padding):
    model = build(name)
    ids, mask = batch(padding)
    want_logits, want_grads = step(model, "sdpa", ids, mask)
    got_logits, got_grads = step(model, "tessel", ids, mask)
    real = mask.bool()
    assert (got_logits[real] - want_logits[real]).abs().max() <= 1e-4
    assert got_grads.keys() == want_grads.keys()
    for key, want in want_grads.items():
        assert (got_grads[key] - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item()), key


def test_the_varlen_path_runs_for_padded_batches(monkeypatch):
    calls = []
    real = huggingface.attention_varlen
    monkeypatch.setattr(huggingface, "attention_varlen", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = build("llama")
    model.set_attn_implementation("tessel")
    with torch.no_grad():
        model(*batch("right"))
    assert len(calls) == 2  # one per layer


def test_packed_sequences_equal_separate_sequences():
    model = build("llama").eval()
    lengths = [7, 3, 9]
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in lengths]
    model.set_attn_implementation("tessel")
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs, dim=1),
                       position_ids=torch.cat([torch.arange(n) for n in lengths])[None]).logits
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s).logits for s in seqs], dim=1)
    assert (packed - alone).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_cached_generation_matches_sdpa(name):
    model = build(name).eval()
    ids, mask = batch("left")
    tokens = {}
    for impl in ("sdpa", "tessel"):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      pad_token_id=0)
    assert torch.equal(tokens["tessel"], tokens["sdpa"])


def test_dropout_falls_back_to_torch_with_the_same_random_draws():
    torch.manual_seed(0)
    model = gpt2(attn_pdrop=0.2).train()
    ids, mask = batch("right")
    results = []
    for impl in ("sdpa", "tessel"):
        torch.manual_seed(3)
        results.append(step(model, impl, ids, mask))
    real = mask.bool()
    assert (results[0][0][real] - results[1][0][real]).abs().max() <= 1e-4
    torch.manual_seed(4)
    other = step(model, "tessel", ids, mask)
    assert (other[0][real] - results[1][0][real]).abs().max() > 1e-3  # dropout did draw


def test_tessel_imports_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import tessel\n"
            "from tessel.integrations import huggingface\n"
            "try:\n"
            "    huggingface.register()\n"
            "except ImportError as err:\n"
            "    assert 'needs transformers' in str(err)\n"
            "else:\n"
            "    raise SystemExit('register() without transformers did not raise')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
