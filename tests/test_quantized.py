"""Quantized self-drafting (drafters/quantized.py) and the kernel's int8 panels beneath it.

- int8 panels compute the product of the per-row int8 weight (`kernels.dequantized`) in float32;
- a `FastForward` with bfloat16 / int8 panels computes the stock forward of the model whose
  weights are replaced by their rounded copies (the slow, obviously-correct reference);
- the drafter is lossless (greedy token for token with ``generate``; its sampled chains keep the
  target's distribution, tests/test_lossless.py), drafts nearly always accepted chains, and
  refuses targets and precisions it cannot serve with a message that says what to do;
- the small-LM drafter it builds on keeps the rows of accepted drafts instead of re-feeding them.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

import drafters
from conftest import mt_bench_prompts, require_kernels, tiny_model
from specdec import speculative_generate
from specdec.engine import fastpath, kernels, linear
from specdec.target import TreeForward

needs_kernel = pytest.mark.usefixtures("native_kernels")


def test_int8_quantization_is_within_half_a_step_per_row():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 70, generator=generator) * torch.linspace(0.1, 5, 40)[:, None]
    values, scales = kernels.quantize_int8(weight)
    assert values.dtype == torch.int8 and scales.shape == (40,)
    assert int(values.abs().max()) == 127  # each row's largest weight uses the full range
    error = (values.float() * scales[:, None] - weight).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-7).all())
    assert torch.equal(kernels.dequantized(weight, torch.int8), values.float() * scales[:, None])


def test_int8_panels_hold_the_values_and_the_column_scales():
    weight = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    values, scales = kernels.quantize_int8(weight)
    panels = kernels.pack(weight, torch.int8)
    assert panels.dtype == torch.int8 and panels.shape == (2, 3 + kernels.SCALE_ROWS, 16)
    assert torch.equal(panels[0, 1], values[:16, 1])
    assert torch.equal(panels[1, 2, :4], values[16:, 2])
    stored = panels[:, 3:].reshape(2, 64).view(torch.float32).reshape(-1)  # [32] column scales
    assert torch.equal(stored[:20], scales) and not stored[20:].any()
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        kernels.pack(weight, torch.float16)


@needs_kernel
@pytest.mark.parametrize("shape", [(37, 19), (200, 33), (1000, 576)])
def test_int8_panels_compute_the_int8_weight_in_float32(shape):
    generator = torch.Generator().manual_seed(shape[1])
    weight = torch.randn(*shape, generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    panels = kernels.pack(weight, torch.int8)
    reference = kernels.dequantized(weight, torch.int8)
    assert (reference - weight).abs().max() > 1e-3  # the test would see a float32 product
    for rows in (1, 5, 6, 7, 12, 13, 64):
        x = torch.randn(rows, shape[1], generator=generator)
        for b in (None, bias):
            got = kernels.native().skinny_linear(x, panels, b, shape[0])
            torch.testing.assert_close(got, F.linear(x, reference, b), atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        x = torch.randn(3, shape[1], generator=generator)
        torch.testing.assert_close(linear(x, weight, precision=torch.int8),
                                   F.linear(x, reference), atol=1e-4, rtol=1e-5)


def rounded_copy(model, dtype):
    """The model with every weight product's weight replaced by what ``dtype`` panels hold."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for module in twin.modules():
            if type(module) is torch.nn.Linear:
                module.weight = torch.nn.Parameter(kernels.dequantized(module.weight, dtype))
    return twin


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_low_precision_fast_forward_is_the_rounded_model(arch, dtype):
    model = tiny_model(arch, vocab=96, scale=4.0)
    fast = fastpath.FastForward(model, panel_dtype=dtype)
    assert fast.kernel and fast.layers[0][1].copy.dtype == dtype
    ours, reference = TreeForward(model, fastpath=fast), TreeForward(rounded_copy(model, dtype))
    exact = TreeForward(model, fastpath=False)
    prompt = torch.tensor([3, 17, 5, 60])
    tokens, parents = torch.tensor([60, 2, 9, 11]), torch.tensor([-1, 0, 1, 1])  # a small tree
    logits = []
    for forward in (ours, reference, exact):
        # the prompt as committed speculative tokens: prefill keeps the model's stock forward
        forward.forward(prompt, torch.arange(-1, 3))
        forward.commit(list(range(4)))
        logits.append(forward.forward(tokens, parents).logits)
    got, want, float32 = logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and it is not the float32 model: the rounding is really there
    assert (float32 - got).abs().max() > 1e-3


def test_fast_forward_refuses_low_precision_without_the_kernel():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="need the skinny kernel"):
        fastpath.FastForward(model, kernel=False, panel_dtype=torch.int8)
    with pytest.raises(ValueError, match="panel_dtype must be one of"):
        fastpath.FastForward(model, panel_dtype=torch.float16)
    other = tiny_model("llama", seed=3)
    with pytest.raises(ValueError, match="built for another model"):
        TreeForward(model, fastpath=fastpath.FastForward(other))


def greedy_reference(model, prompt, n):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n)[0].tolist()


@pytest.mark.parametrize("arch,precision,how", [
    ("llama", "bfloat16", "bfloat16 kernel panels"),
    ("llama", "int8", "int8 kernel panels"),
    ("qwen2", "auto", "int8 kernel panels"),
    ("gpt2", "bfloat16", "bfloat16 model copy"),
    ("gpt2", "auto", "bfloat16 model copy"),
])
@pytest.mark.parametrize("verifier", ["greedy", "exact"])
def test_quantized_self_drafting_matches_generate(arch, precision, how, verifier):
    if "kernel" in how:
        require_kernels()
    target = tiny_model(arch, vocab=96, scale=4.0)
    target.generation_config.eos_token_id = None
    prompt = [5, 17, 3, 40]
    drafter = drafters.get("quantized", depth=5, precision=precision)
    out = speculative_generate(target, [prompt], drafter=drafter, verifier=verifier,
                               max_new_tokens=40)
    assert out.sequences[0].tolist() == greedy_reference(target, prompt, 40)
    assert drafter.how == how
    # the same model in lower precision: nearly every drafted token is the target's
    assert out.stats.tau > 4.0
    # a second generation reuses the low-precision copy
    model = drafter.model
    speculative_generate(target, [prompt], drafter=drafter, verifier=verifier, max_new_tokens=8)
    assert drafter.model is model


@needs_kernel
def test_quantized_drafter_samples_its_drafts_when_the_target_samples():
    """mode="auto": top-1 chains at temperature 0; at temperature > 0 i.i.d. draws from the
    recorded draft distribution, which the exact verifier accepts nearly always (p ~ q)."""
    target = tiny_model("llama", vocab=96, scale=1.0)  # flat: top-1 drafts often miss a sample
    target.generation_config.eos_token_id = None
    runs = {}
    for mode in ("auto", "greedy"):
        drafter = drafters.get("quantized", depth=4, mode=mode)
        trees = []
        original = drafter.propose
        drafter.propose = lambda state: trees.append(original(state)) or trees[-1]
        out = speculative_generate(target, [[5, 17, 3]], drafter=drafter, verifier="exact",
                                   max_new_tokens=48, temperature=1.0,
                                   generator=torch.Generator().manual_seed(0))
        runs[mode] = out.stats.tau
        kinds = {tree.sampling_of(-1) for tree in trees if len(tree)}
        assert kinds == ({"iid"} if mode == "auto" else {"deterministic"})
    assert runs["auto"] > 3.5 and runs["auto"] > runs["greedy"] + 0.5
    drafter = drafters.get("quantized", depth=4)
    speculative_generate(target, [[5, 17, 3]], drafter=drafter, verifier="greedy",
                         max_new_tokens=8)
    assert drafter.mode == "greedy"


def test_quantized_drafter_says_what_to_change(monkeypatch):
    with pytest.raises(ValueError, match="precision must be one of"):
        drafters.get("quantized", precision="fp8")
    with pytest.raises(ValueError, match="depth must be >= 1"):
        drafters.get("quantized", depth=0)
    half = tiny_model("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="already in torch.bfloat16.*load the target in float32"):
        speculative_generate(half, [[1, 2, 3]], drafter="quantized", verifier="greedy",
                             max_new_tokens=4)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="int8 self-drafting.*model_type 'gpt2'.*"
                                         "precision='bfloat16'"):
        speculative_generate(gpt2, [[1, 2, 3]], drafter=drafters.get("quantized", precision="int8"),
                             verifier="greedy", max_new_tokens=4)
    monkeypatch.setenv(kernels.ENV, "0")
    with pytest.raises(ValueError, match=f"unavailable here \\({kernels.ENV}=0\\)"):
        speculative_generate(tiny_model("llama"), [[1, 2, 3]], verifier="greedy",
                             drafter=drafters.get("quantized", precision="int8"), max_new_tokens=4)
    off = drafters.get("quantized")  # auto: a bfloat16 copy instead
    speculative_generate(tiny_model("llama"), [[1, 2, 3]], drafter=off, verifier="greedy",
                         max_new_tokens=4)
    assert off.how == "bfloat16 model copy"


def test_small_lm_drafter_keeps_the_rows_of_accepted_drafts():
    """After a step whose drafts were accepted, only the tokens the draft cache lacks are fed:
    with every chain accepted that is one token per step (the bonus), not the whole path."""
    target = tiny_model("llama", vocab=96, scale=4.0)
    target.generation_config.eos_token_id = None
    drafter = drafters.get("small-lm", model=copy.deepcopy(target), depth=3)
    fed = []
    original = TreeForward.forward

    def counting(self, token_ids, parents):
        chain = torch.arange(-1, len(parents) - 1)
        if self.model is drafter.model and bool((parents == chain).all()):
            fed.append(len(token_ids))  # the sync's chain of committed tokens
        return original(self, token_ids, parents)

    prompt = [5, 17, 3, 40]
    TreeForward.forward = counting
    try:
        out = speculative_generate(target, [prompt], drafter=drafter, verifier="greedy",
                                   max_new_tokens=24)
    finally:
        TreeForward.forward = original
    assert out.sequences[0].tolist() == greedy_reference(target, prompt, 24)
    assert out.stats.tau > 3.5  # the draft is the target: every chain is accepted...
    # ...so each step's sync feeds at most 2 tokens (the last draft, never fed, and the bonus),
    # where re-feeding the accepted path would feed 4
    assert fed and max(fed) <= 2


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_embedded_model_quantized_self_drafting(embedded, precision):
    """On the real model: token for token equal to generate, and tau above 3.5."""
    if precision == "int8":
        require_kernels()
    model, tokenizer = embedded
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": mt_bench_prompts(2)[1]}], tokenize=False,
        add_generation_prompt=True)
    ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids
    reference = model.generate(ids, max_new_tokens=64, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id)
    drafter = drafters.get("quantized", precision=precision)
    out = speculative_generate(model, ids, drafter=drafter, verifier="greedy", max_new_tokens=64,
                               eos_token_id=tokenizer.eos_token_id)
    assert out.sequences.tolist() == reference.tolist()
    assert drafter.how == (f"{precision} kernel panels" if kernels.available()
                           else f"{precision} model copy")
    assert out.stats.tau > 3.5
