"""specdec.engine.fastpath: the lean Llama-family forward computes what the Hugging Face forward computes
(logits, hidden states, cache), on trees, after commits and grown over several calls; it is used
by the loop and stays greedy-lossless on the embedded model; unsupported models and bad settings
are refused clearly."""

import random

import pytest
import torch
import transformers
from torch import nn

import specdec
from conftest import mt_bench_prompts, require_kernels, tiny_config, tiny_model
from specdec import engine
from specdec.engine import fastpath, kernels
from specdec.engine.backends import KERNEL_MAX, Linear, mkl_available, packing_works
from specdec.target import TreeForward
from specdec.tree import DraftTree

FAST_ARCHS = ["llama", "qwen2", "mistral"]


def biased_qwen2():
    """Qwen2 carries biases on q/k/v: the fused projection must add them."""
    model = tiny_model("qwen2")
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                assert proj.bias is not None
                proj.bias.normal_(0, 0.5)
    return model


def pair(model, hidden=True, kernel=None):
    """The stock forward and the fast one (``kernel``: None as built by default, True/False to
    force the skinny-GEMM kernel on or off)."""
    stock = TreeForward(model, fastpath=False, transposed_gemm=False, output_hidden_states=hidden)
    fast = TreeForward(model, fastpath=True, output_hidden_states=hidden)
    if kernel:
        require_kernels()
    if kernel is not None:
        fast.fast = fastpath.FastForward(model, kernel=kernel)
        assert fast.fast.kernel is kernel
    return stock, fast


def assert_same_outputs(ref, got, atol=1e-5):
    torch.testing.assert_close(got.logits, ref.logits, atol=atol, rtol=0)
    if ref.hidden_states is not None:
        assert len(got.hidden_states) == len(ref.hidden_states)
        for a, b in zip(ref.hidden_states, got.hidden_states):
            torch.testing.assert_close(b, a, atol=atol, rtol=0)


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("arch", FAST_ARCHS + ["qwen2-bias"])
def test_fast_forward_matches_stock_over_many_steps(arch, kernel):
    model = biased_qwen2() if arch == "qwen2-bias" else tiny_model(arch, scale=3.0)
    stock, fast = pair(model, kernel=kernel)
    assert fast.fast is not None and stock.fast is None
    rng = random.Random(arch)
    committed = [rng.randrange(96) for _ in range(9)]
    for fwd in (stock, fast):
        fwd.prefill(torch.tensor(committed[:-1]))
    for step in range(14):
        # 1 to 15 rows (the stock, MKL-packed and stock-again ranges), and twice more rows than
        # the skinny kernel takes (F.linear again)
        n = rng.randint(0, 14) if step < 12 else KERNEL_MAX + rng.randint(0, 8)
        tree = DraftTree([rng.randrange(96) for _ in range(n)],
                         [rng.randint(-1, i - 1) for i in range(n)])
        outs = [fwd.verify(committed[-1], tree) for fwd in (stock, fast)]
        assert_same_outputs(*outs)
        path = tree.path_to(rng.randrange(n)) if n else []
        for fwd in (stock, fast):
            fwd.commit_path(path)
        committed += [tree.tokens[i] for i in path] + [rng.randrange(96)]
    for a, b in zip(stock.cache.layers, fast.cache.layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=0)


def test_fast_forward_of_a_tree_grown_level_by_level():
    """A single new token whose siblings are already cached must not see them (the mask is kept
    for one-row forwards unless every cached token is visible)."""
    model = tiny_model("llama", scale=3.0)
    stock, fast = pair(model, hidden=False)
    for fwd in (stock, fast):
        fwd.prefill(torch.tensor([4, 8, 15, 16, 23]))
    for tokens, parents in (([42], [-1]), ([7, 9], [0, 0]), ([3], [1]), ([5], [0])):
        outs = [fwd.forward(torch.tensor(tokens), torch.tensor(parents)) for fwd in (stock, fast)]
        assert_same_outputs(*outs)


def test_fast_forward_in_bfloat16_matches_stock_argmax():
    model = tiny_model("llama", scale=3.0).to(torch.bfloat16)
    stock, fast = pair(model, hidden=False)
    assert fast.fast.pack is False  # MKL packs float32 only
    for fwd in (stock, fast):
        fwd.prefill(torch.tensor([1, 2, 3, 4, 5, 6]))
    tree = DraftTree([7, 8, 9, 10, 11], [-1, 0, 1, -1, 3])
    ref, got = (fwd.verify(6, tree) for fwd in (stock, fast))
    torch.testing.assert_close(got.logits.float(), ref.logits.float(), atol=0.05, rtol=0)
    assert torch.equal(got.logits.argmax(-1), ref.logits.argmax(-1))


@pytest.mark.skipif(not mkl_available(), reason="packing needs PyTorch built with MKL")
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 12, 13, 16])
def test_packed_linear_equals_f_linear_for_every_row_count(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=generator)
    bias = torch.randn(96, generator=generator)
    layer = Linear(weight, bias, "mkl")
    assert layer.copy is not None
    x = torch.randn(rows, 40, generator=generator)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, bias),
                               atol=1e-4, rtol=1e-5)
    assert packing_works(weight)


def test_weights_changed_after_building_are_picked_up():
    model = tiny_model("llama")
    stock, fast = pair(model, hidden=False)
    prompt = torch.tensor([1, 2, 3, 4])
    fast.prefill(prompt)
    before = fast.verify(5, DraftTree([6, 7, 8, 9], [-1, 0, 1, 2])).logits
    fast.rollback()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(3.0)
        model.model.layers[1].self_attn.k_proj.weight.add_(0.5)
    stock.prefill(prompt)
    fast.crop(0)
    fast.prefill(prompt)
    tree = DraftTree([6, 7, 8, 9], [-1, 0, 1, 2])
    ref, got = stock.verify(5, tree).logits, fast.verify(5, tree).logits
    assert not torch.allclose(before, ref, atol=1e-3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # a replaced parameter (load_state_dict(assign=True), module.weight = ...) is seen too
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 0.5)
    for fwd in (stock, fast):
        fwd.crop(0)
        fwd.prefill(prompt)
    ref, got = stock.verify(5, tree).logits, fast.verify(5, tree).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_unsupported_models_use_the_stock_forward_and_true_says_why():
    gpt2 = tiny_model("gpt2")
    assert "model_type" in fastpath.supported(gpt2)
    assert TreeForward(gpt2).fast is None
    with pytest.raises(ValueError, match="fast path cannot run this model.*model_type"):
        TreeForward(gpt2, fastpath=True)
    config = tiny_config("mistral")
    config.sliding_window = 8
    windowed = transformers.AutoModelForCausalLM.from_config(config).eval()
    assert "sliding" in fastpath.supported(windowed)
    hooked = tiny_model("llama")
    hooked.model.layers[0].mlp.forward = lambda x: x
    assert "replaced forward" in fastpath.supported(hooked)
    assert TreeForward(hooked).fast is None


def test_settings_and_environment(monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="fastpath must be True, False or 'auto'"):
        TreeForward(model, fastpath="yes")
    monkeypatch.setenv(fastpath.ENV, "0")
    assert TreeForward(model).fast is None
    assert TreeForward(model, fastpath=True).fast is not None  # explicit beats the environment
    monkeypatch.setenv(fastpath.ENV, "maybe")
    with pytest.raises(ValueError, match="SPECDEC_FASTPATH must be 0 or 1"):
        TreeForward(model)
    monkeypatch.setenv(fastpath.ENV, "1")
    with pytest.raises(ValueError, match="SPECDEC_FASTPATH=1 but the fast path cannot run"):
        TreeForward(tiny_model("gpt2"))
    monkeypatch.delenv(fastpath.ENV)
    monkeypatch.setattr(fastpath, "AUTO_MAX_BYTES", 10)
    assert TreeForward(model).fast is None  # "auto" declines copies beyond its memory bound


@pytest.mark.slow
def test_loop_uses_the_fast_path_and_stays_greedy_lossless_on_the_embedded_model(embedded,
                                                                                monkeypatch):
    model, tokenizer = embedded
    built = []
    original = engine.for_model

    def spy(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(engine, "for_model", spy)
    for text in mt_bench_prompts(2):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(chat, return_tensors="pt", add_special_tokens=False).input_ids
        want = model.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1]:].tolist()
        for drafter in ("none", "pld"):
            out = specdec.speculative_generate(model, ids, drafter=drafter, verifier="greedy",
                                               max_new_tokens=48)
            assert out.new_token_ids == want, drafter
    assert built and all(isinstance(f, fastpath.FastForward) for f in built)
    assert built[0].kernel == kernels.available()
    assert built[0].pack == (mkl_available() and not built[0].kernel)


@pytest.mark.slow
def test_no_drafter_decodes_one_token_per_step(embedded):
    model, tokenizer = embedded
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = specdec.speculative_generate(model, ids, drafter="none", verifier="greedy",
                                       max_new_tokens=12)
    assert out.stats.steps == len(out.new_token_ids) == 12
    assert out.new_token_ids == model.generate(ids, max_new_tokens=12, do_sample=False)[
        0, ids.shape[1]:].tolist()


def test_cache_rows_are_written_in_place_and_commits_copy_only_the_moved_rows():
    model = tiny_model("llama", scale=3.0)
    stock, fast = pair(model, hidden=False)
    for fwd in (stock, fast):
        fwd.prefill(torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]))
    pointers = set()
    rng = random.Random(7)
    root = 5
    for step in range(20):
        tree = DraftTree([rng.randrange(96) for _ in range(5)], [-1, 0, -1, 2, 3])
        outs = [fwd.verify(root, tree) for fwd in (stock, fast)]
        assert_same_outputs(*outs)
        accepted = [2, 3] if step % 2 else [0, 1]  # a second branch: rows move down
        for fwd in (stock, fast):
            fwd.commit_path(accepted)
        pointers.add(fast.cache.layers[0].keys.data_ptr())
        root = rng.randrange(96)
    # one buffer per layer after the first move (grown once at most), not one tensor per step
    assert len(pointers) <= 2
    for a, b in zip(stock.cache.layers, fast.cache.layers):
        torch.testing.assert_close(b.keys, a.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.values, a.values, atol=1e-5, rtol=0)


def test_decisions_follow_the_weights_when_they_change_dtype():
    """Packing is decided per build: a model cast after the copies were made is rebuilt without
    it (MKL packs float32 only) and still matches the stock forward."""
    model = tiny_model("llama", scale=3.0)
    fast = fastpath.FastForward(model, kernel=False)
    assert fast.pack == mkl_available()
    model.to(torch.bfloat16)
    fast.refresh()
    assert fast.pack is False and fast.layers[0][1].weight.dtype == torch.bfloat16
    default = fastpath.FastForward(model)
    assert default.kernel is False  # the kernel is float32 only
    with pytest.raises(ValueError, match="skinny kernel needs float32 weights on CPU"):
        fastpath.FastForward(model, kernel=True)
    with pytest.raises(ValueError, match="MKL packing needs float32 weights on CPU"):
        fastpath.FastForward(model, pack=True)


def test_one_shared_forward_per_model_and_kind(monkeypatch):
    """`engine.for_model` makes a model's fused or transposed copies once, whoever asks."""
    monkeypatch.delenv(fastpath.ENV, raising=False)
    model = tiny_model("llama")
    assert engine.forward_kind(model) == "fast"
    assert engine.forward_kind(model, False) == "transposed"
    assert engine.forward_kind(model, False, False) == "stock"
    fast = engine.for_model(model)
    assert isinstance(fast, fastpath.FastForward) and engine.for_model(model) is fast
    assert TreeForward(model).fast is fast
    transposed = engine.for_model(model, False)
    assert isinstance(transposed, engine.TransposedLinears)
    assert TreeForward(model, fastpath=False).linears is transposed
    assert engine.for_model(model, False, False) is None
    assert engine.for_model(tiny_model("llama")) is not fast  # another model, its own copies
