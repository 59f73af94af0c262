"""Generation agrees with transformers' `generate`: greedy (single and batched left-padded prompts,
EOS and padding), LoRA unmerged = merged, seeded sampling, and the warpers themselves.
The slow tests run SmolLM2-135M from its GGUF against transformers loading the same file."""

import numpy as np
import pytest

import lora_jax
from lora_jax.generation import generate, sampling
from lora_jax.generation.generate import compiled_generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_jax.models import from_pretrained

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.15, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(d)
    model, params, _ = from_pretrained(str(d))
    return hf, model, params, str(d)


def hf_generate(hf, ids, mask, n, **kw):
    import torch

    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                          do_sample=False, **kw)
    return out.numpy()


N = 8  # one max_new_tokens throughout: one compilation per model and sampling mode
PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [11, 3, 60], [70, 8, 8, 21, 5]]


def left_pad(prompts, pad=0):
    n = max(map(len, prompts))
    ids = np.array([[pad] * (n - len(p)) + p for p in prompts], np.int64)
    mask = np.array([[0] * (n - len(p)) + [1] * len(p) for p in prompts], np.int64)
    return ids, mask


def test_greedy_matches_transformers(tiny):
    hf, model, params, _ = tiny
    ids, mask = left_pad(PROMPTS[:1])
    expected = hf_generate(hf, ids, mask, N, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=N, eos_token_id=None), expected)


def test_batched_left_padded_with_eos_matches_transformers(tiny):
    hf, model, params, _ = tiny
    ids, mask = left_pad(PROMPTS)
    free = hf_generate(hf, ids, mask, N, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=N, eos_token_id=None), free)
    eos = int(free[0, ids.shape[1] + 2])  # row 0 stops after 3 tokens; the others later or never
    expected = hf_generate(hf, ids, mask, N, pad_token_id=1, eos_token_id=eos)
    got = generate(model, params, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=1)
    np.testing.assert_array_equal(got, expected)
    assert (got[0, ids.shape[1] + 3:] == 1).all()
    # every row stopping early ends the loop: the output is shorter than prompt + max_new_tokens
    firsts = [int(t) for t in free[:, ids.shape[1]]]
    got = generate(model, params, ids, mask, max_new_tokens=N, eos_token_id=firsts, pad_token_id=1)
    np.testing.assert_array_equal(got, hf_generate(hf, ids, mask, N, pad_token_id=1, eos_token_id=firsts))
    assert got.shape == (3, ids.shape[1] + 1)
    # min_new_tokens: EOS is masked until that many tokens were generated (transformers' processor)
    got = generate(model, params, ids, mask, max_new_tokens=N, min_new_tokens=3, eos_token_id=firsts, pad_token_id=1)
    expected = hf_generate(hf, ids, mask, N, pad_token_id=1, eos_token_id=firsts, min_new_tokens=3)
    np.testing.assert_array_equal(got, expected)
    assert got.shape[1] > ids.shape[1] + 3


def test_checkpoint_generation_config_eos_and_pad_are_the_defaults(tiny, tmp_path):
    """transformers' generate stops at generation_config.json's EOS ids (not config.json's) and pads
    finished rows with its pad id or else the first EOS; so do our defaults."""
    import json

    from transformers import AutoModelForCausalLM

    from lora_jax.models import from_pretrained

    hf, model, params, _ = tiny
    ids, mask = left_pad(PROMPTS)
    free = generate(model, params, ids, mask, max_new_tokens=N, eos_token_id=None)
    eos = [int(free[0, ids.shape[1] + 1]), int(free[2, ids.shape[1] + 3])]
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=95, pad_token_id=None)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}))
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model2, params2, _ = from_pretrained(str(tmp_path))
    assert model2.cfg.eos_token_id == tuple(eos) and model2.cfg.pad_token_id is None
    expected = hf_generate(hf2, ids, mask, N)
    got = generate(model2, params2, ids, mask, max_new_tokens=N)
    np.testing.assert_array_equal(got, expected)
    assert (got[0, ids.shape[1] + 2:] == eos[0]).all()  # row 0 stopped: padded with the first EOS id
    (tmp_path / "generation_config.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"generation_config.json is not valid JSON \(line 1"):
        from_pretrained(str(tmp_path))


def test_repetition_penalty_matches_transformers(tiny):
    hf, model, params, _ = tiny
    ids, mask = left_pad(PROMPTS)
    for penalty in (1.5, 0.7):
        expected = hf_generate(hf, ids, mask, N, pad_token_id=0, eos_token_id=None, repetition_penalty=penalty)
        got = generate(model, params, ids, mask, max_new_tokens=N, repetition_penalty=penalty, eos_token_id=None)
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, generate(model, params, ids, mask, max_new_tokens=N, eos_token_id=None))


def test_gpt2_batched_greedy_matches_transformers(tmp_path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_jax.models import from_pretrained

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                    initializer_range=0.15)).eval()
    hf.save_pretrained(tmp_path)
    model, params, _ = from_pretrained(str(tmp_path))
    ids, mask = left_pad(PROMPTS)
    expected = hf_generate(hf, ids, mask, N, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=N, eos_token_id=None), expected)


def test_scanned_layers_generate_the_same(tiny):
    from lora_jax.models import from_pretrained

    hf, model, params, d = tiny
    scanned, sparams, _ = from_pretrained(d, scan_layers=True)
    ids, mask = left_pad(PROMPTS)
    np.testing.assert_array_equal(generate(scanned, sparams, ids, mask, max_new_tokens=N, eos_token_id=None),
                                  generate(model, params, ids, mask, max_new_tokens=N, eos_token_id=None))


def test_lora_unmerged_equals_merged(tiny):
    import jax

    _, model, params, _ = tiny
    cfg = lora_jax.LoraConfig(r=4, alpha=8, target_modules=lora_jax.ALL_LINEAR)
    adapted = lora_jax.inject(params, cfg, jax.random.key(1))
    lora, frozen = lora_jax.split(adapted)
    lora, scales = lora_jax.split_constants(lora)
    lora = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), lora)  # B != 0
    adapted = lora_jax.combine(lora, scales, frozen)
    ids, mask = left_pad(PROMPTS)
    unmerged = generate(model.clone(lora=cfg), adapted, ids, mask, max_new_tokens=N)
    merged = generate(model, lora_jax.merge(adapted, cfg), ids, mask, max_new_tokens=N)
    np.testing.assert_array_equal(unmerged, merged)
    assert not np.array_equal(unmerged, generate(model, params, ids, mask, max_new_tokens=N))


def test_sampling_is_seeded_and_degenerates_to_greedy(tiny):
    _, model, params, _ = tiny
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=N, temperature=1.5)
    a = generate(model, params, ids, mask, seed=3, **kw)
    np.testing.assert_array_equal(a, generate(model, params, ids, mask, seed=3, **kw))
    assert not np.array_equal(a, generate(model, params, ids, mask, seed=4, **kw))
    greedy = generate(model, params, ids, mask, max_new_tokens=N)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=N, temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=N, temperature=0.8, top_p=1e-6), greedy)
    # transformers' do_sample switch: True samples at temperature 1.0, False is greedy
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=N, do_sample=True, seed=3),
                                  generate(model, params, ids, mask, max_new_tokens=N, temperature=1.0, seed=3))
    np.testing.assert_array_equal(generate(model, params, ids, mask, max_new_tokens=N, do_sample=False), greedy)
    with pytest.raises(ValueError, match="only applies when sampling"):
        generate(model, params, ids, mask, max_new_tokens=N, do_sample=False, temperature=0.7)
    with pytest.raises(ValueError, match="do_sample=True needs a temperature > 0"):
        generate(model, params, ids, mask, max_new_tokens=N, do_sample=True, temperature=0)
    # sampling without top_k filters the top 50 as transformers' generate does (top_k=0: off)
    assert sampling.SamplingParams.make(temperature=1.5).mode == (True, True, False, False)
    assert sampling.SamplingParams.make(temperature=1.5, top_k=0).mode == (True, False, False, False)
    # temperature / k / p are traced: one compilation per sampling mode and shape
    fn = compiled_generate(model, N, (True, True, False, False))
    before = fn._cache_size()
    generate(model, params, ids, mask, max_new_tokens=N, temperature=0.5, top_k=7)
    generate(model, params, ids, mask, max_new_tokens=N, temperature=2.0, top_k=3, seed=9)
    assert fn._cache_size() == max(before, 1)


def test_warpers_match_transformers():
    import jax.numpy as jnp
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
    for k in (1, 5, 50, 80):
        ours = np.asarray(sampling.top_k_filter(jnp.asarray(scores), jnp.asarray(k)))
        theirs = TopKLogitsWarper(k)(None, torch.tensor(scores)).numpy()
        np.testing.assert_array_equal(ours, theirs)
    for p in (0.05, 0.5, 0.9, 0.999):
        ours = np.asarray(sampling.top_p_filter(jnp.asarray(scores), jnp.asarray(p)))
        theirs = TopPLogitsWarper(p)(None, torch.tensor(scores)).numpy()
        np.testing.assert_array_equal(ours, theirs)


def test_argument_errors(tiny):
    _, model, params, _ = tiny
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(model, params, [[5, 6, 0]], [[1, 1, 0]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, params, [[5, 6]], max_new_tokens=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate(model, params, [[5, 6]], max_new_tokens=2, min_new_tokens=-1)
    with pytest.raises(ValueError, match="token id 96 outside the model's vocabulary"):  # was NaN logits, token 0
        generate(model, params, [[5, 96]], max_new_tokens=2)
    with pytest.raises(ValueError, match="token id -100 outside"):
        generate(model, params, [[-100, 5]], [[0, 1]], max_new_tokens=2)
    with pytest.raises(ValueError, match="pad them on the left"):
        generate(model, params, [[5, 6, 7], [8]], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, params, [[5, 6]], max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(model, params, [[5, 6]], max_new_tokens=2, repetition_penalty=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, [[5, 6]], max_new_tokens=2, temperature=1, top_p=1.5)
    for kw in (dict(top_k=50), dict(top_p=0.9)):  # greedy would ignore them: refused instead
        with pytest.raises(ValueError, match="only apply when sampling"):
            generate(model, params, [[5, 6]], max_new_tokens=2, **kw)


def test_chat_stops_at_the_tokenizer_and_checkpoint_eos():
    from types import SimpleNamespace as NS

    from lora_jax.generation.chat import _stop_ids

    assert _stop_ids(NS(eos_token_id=2), NS(cfg=NS(eos_token_id=(5, 2)))) == [2, 5]
    assert _stop_ids(NS(eos_token_id=None), NS(cfg=NS(eos_token_id=7))) == [7]
    assert _stop_ids(NS(eos_token_id=None), object()) is None


# -- SmolLM2-135M-Instruct from its GGUF vs transformers loading the same file -------------------


@pytest.mark.slow
def test_smollm2_logits_and_greedy_chat_match_transformers():
    import torch

    import _smollm2 as s

    from lora_jax.generation import chat, chat_input_ids

    model, params = s.ours()  # scanned layers (fast compile); unrolled = scanned is tested above
    hf, tok = s.hf_model(), s.tokenizer()
    ids = chat_input_ids(tok, s.PROMPT)
    logits, _ = model.apply({"params": params}, ids)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    err = float(np.abs(np.asarray(logits) - ref).max())
    print(f"SmolLM2 logits max-abs diff vs transformers: {err:.2e}")
    assert err < 2e-3
    n = 24
    with torch.no_grad():
        expected = hf.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=n, do_sample=False,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).numpy()
    got = generate(model, params, ids, max_new_tokens=n, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    np.testing.assert_array_equal(got, expected)
    reply = chat(model, params, tok, s.PROMPT, max_new_tokens=n)
    assert reply == tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert reply
