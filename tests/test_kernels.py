"""specdec.kernels: the skinny-GEMM kernel computes F.linear (every row count, partial panels,
biases, one or two threads), refuses bad input clearly, and can be switched off or fail to build
without breaking the fast path (which then uses MKL's packed GEMM or F.linear)."""

import re

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from specdec import fastpath, kernels

needs_kernel = pytest.mark.skipif(not kernels.available(),
                                  reason=f"kernel not built here: {kernels.load_error()}")


def test_pack_lays_out_panels_of_sixteen_columns():
    weight = torch.arange(20 * 3, dtype=torch.float32).view(20, 3)
    panels = kernels.pack(weight)
    assert panels.shape == (2, 3, 16)
    assert torch.equal(panels[0, 1], weight[:16, 1])  # panel 0, k = 1: columns 0-15
    assert torch.equal(panels[1, 2, :4], weight[16:, 2])
    assert torch.count_nonzero(panels[1, :, 4:]) == 0  # padding
    with pytest.raises(ValueError, match="2-D float32 CPU weight"):
        kernels.pack(weight.double())


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(16, 8), (37, 19), (96, 64), (200, 33), (1000, 576)])
def test_skinny_linear_equals_f_linear(shape, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(shape[0])
        weight = torch.randn(*shape, generator=generator)
        bias = torch.randn(shape[0], generator=generator)
        for b in (None, bias):
            layer = kernels.SkinnyLinear(weight, b)
            for rows in (1, 2, 3, 7, 8, 9, 16, 17, 33, 70):
                x = torch.randn(rows, shape[1], generator=generator)
                got = layer(x)
                assert got.shape == (rows, shape[0]) and got.dtype == torch.float32
                torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-4, rtol=1e-5)
        # a non-contiguous input (a column slice of a wider tensor) is read correctly
        wide = torch.randn(5, shape[1] * 2, generator=generator)
        x = wide[:, ::2]
        torch.testing.assert_close(kernels.SkinnyLinear(weight, None)(x), F.linear(x, weight),
                                   atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(previous)


@needs_kernel
@pytest.mark.parametrize("shape", [(37, 19), (200, 33), (1000, 576)])
def test_bfloat16_panels_compute_the_bf16_rounded_weight_in_float32(shape):
    """bf16 panels: the product of the bf16-rounded weight, accumulated in float32 (float32
    tolerance against F.linear on the rounded weight, which a bf16 product would not meet)."""
    generator = torch.Generator().manual_seed(shape[1])
    weight = torch.randn(*shape, generator=generator)
    bias = torch.randn(shape[0], generator=generator)
    panels = kernels.pack(weight, torch.bfloat16)
    assert panels.dtype == torch.bfloat16 and panels.shape == kernels.pack(weight).shape
    rounded = weight.bfloat16().float()
    assert not torch.equal(rounded, weight)
    for rows in (1, 5, 6, 7, 12, 13, 64):
        x = torch.randn(rows, shape[1], generator=generator)
        for b in (None, bias):
            got = kernels.native().skinny_linear(x, panels, b, shape[0])
            torch.testing.assert_close(got, F.linear(x, rounded, b), atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # kernels.linear caches panels per dtype
        x = torch.randn(3, shape[1], generator=generator)
        torch.testing.assert_close(kernels.linear(x, weight, panel_dtype=torch.bfloat16),
                                   F.linear(x, rounded), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(kernels.linear(x, weight), F.linear(x, weight),
                                   atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        kernels.pack(weight, torch.float16)


@needs_kernel
def test_profile_key_names_the_kernel_build(monkeypatch):
    """A latency profile measured with one build of the kernel is not reused with another (a
    changed source or another CPU)."""
    from specdec.cost import profile_key

    model = tiny_model("llama")
    assert fastpath.kernel_wanted(model)
    before = profile_key(model, 16)["kernel"]
    assert kernels.build_id() in before
    monkeypatch.setattr(kernels, "_host_signature", lambda: "another-cpu")
    assert profile_key(model, 16)["kernel"] != before


@needs_kernel
def test_kernel_refuses_mismatched_input():
    layer = kernels.SkinnyLinear(torch.randn(32, 8), None)
    with pytest.raises(RuntimeError, match="x has 9 columns, the weight 8"):
        layer(torch.randn(2, 9))
    with pytest.raises(RuntimeError, match="2-D float32 CPU tensor"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="bias must be float32 with 32 elements"):
        kernels.SkinnyLinear(torch.randn(32, 8), torch.randn(31))(torch.randn(2, 8))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.enabled() and not kernels.available()
    model = tiny_model("llama", scale=3.0)
    fast = fastpath.FastForward(model)
    assert fast.kernel is False and fast.pack == fastpath._mkl_available()
    assert not fastpath.kernel_wanted(model)
    with pytest.raises(ValueError, match="skinny kernel needs float32 weights on CPU"):
        fastpath.FastForward(model, kernel=True)
    monkeypatch.setenv(kernels.ENV, "yes")
    with pytest.raises(ValueError, match="SPECDEC_KERNEL must be 0 or 1"):
        kernels.enabled()


def test_a_failed_build_falls_back_and_says_why(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})

    def broken():
        raise OSError("no C++ compiler")

    monkeypatch.setattr(kernels, "_build", broken)
    assert not kernels.available()
    assert "no C++ compiler" in kernels.load_error()
    model = tiny_model("llama", scale=3.0)
    assert fastpath.FastForward(model).kernel is False
    with pytest.raises(ValueError, match=re.escape("could not be built: OSError: no C++ compiler")):
        fastpath.FastForward(model, kernel=True)
    with pytest.raises(RuntimeError, match="not available"):
        kernels.SkinnyLinear(torch.randn(4, 4), None)


@needs_kernel
def test_fused_linear_routes_rows_to_the_kernel_only_in_its_range(monkeypatch):
    weight, bias = torch.randn(48, 16), torch.randn(48)
    layer = fastpath.FusedLinear(weight, bias, pack=True, kernel=True)
    assert layer.skinny is not None and layer.packed is None  # one fast copy, not two
    calls = []
    original = layer.skinny.__call__
    monkeypatch.setattr(layer, "skinny", lambda x: calls.append(x.shape[0]) or original(x))
    for rows in (1, fastpath.KERNEL_MAX, fastpath.KERNEL_MAX + 1):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(layer(x), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
    assert calls == [1, fastpath.KERNEL_MAX]


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2-bias", "mistral"])
def test_native_layer_loop_equals_the_python_loop_exactly(arch, monkeypatch):
    """decoder_layers runs the same operations as FastForward's Python loop: the same logits,
    hidden states and cache rows, bit for bit, over trees, single tokens and commits."""
    import random

    from specdec.target import TreeForward
    from specdec.tree import DraftTree
    from test_fastpath import biased_qwen2

    model = biased_qwen2() if arch == "qwen2-bias" else tiny_model(arch, scale=3.0)
    native = TreeForward(model, fastpath=True, output_hidden_states=True)
    native.fast = fastpath.FastForward(model, kernel=True)
    python = TreeForward(model, fastpath=True, output_hidden_states=True)
    python.fast = fastpath.FastForward(model, kernel=True)
    python.fast.native = None
    calls = []
    module, *rest = native.fast.native

    class Spy:
        def decoder_layers(self, *args):
            calls.append(args[0].shape[0])
            return module.decoder_layers(*args)

    native.fast.native = (Spy(), *rest)
    rng = random.Random(arch)
    root = 3
    for fwd in (native, python):
        fwd.prefill(torch.tensor([5, 9, 2, 7, 1]))
    for step in range(10):
        n = rng.randint(0, 12)
        tree = DraftTree([rng.randrange(96) for _ in range(n)],
                         [rng.randint(-1, i - 1) for i in range(n)])
        a, b = (fwd.verify(root, tree) for fwd in (native, python))
        assert torch.equal(a.logits, b.logits)
        assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
        path = tree.path_to(rng.randrange(n)) if n else []
        for fwd in (native, python):
            fwd.commit_path(path)
        root = rng.randrange(96)
    assert len(calls) == 10  # every verify went through the native loop
    for x, y in zip(native.cache.layers, python.cache.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


@needs_kernel
@pytest.mark.parametrize("width", [576, 37, 8, 3])
def test_native_rms_norm_rows_equals_f_rms_norm(width):
    generator = torch.Generator().manual_seed(width)
    h = torch.randn(5, width, generator=generator) * 3
    weight = torch.randn(width, generator=generator)
    got = kernels.native().rms_norm_rows(h, weight, 1e-5)
    torch.testing.assert_close(got, F.rms_norm(h, (width,), weight, 1e-5), atol=1e-6, rtol=1e-5)
    # a column slice (not contiguous) is read correctly
    wide = torch.randn(5, 2 * width, generator=generator)
    torch.testing.assert_close(kernels.native().rms_norm_rows(wide[:, ::2], weight, 1e-6),
                               F.rms_norm(wide[:, ::2], (width,), weight, 1e-6),
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="weight float32 with H elements"):
        kernels.native().rms_norm_rows(h, weight[:-1], 1e-5)


def test_kernels_linear_equals_f_linear_and_follows_weight_changes():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 24, generator=generator)
    for shape in ((1, 24), (3, 5, 24), (kernels.MAX_ROWS + 1, 24)):
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(kernels.linear(x, weight), F.linear(x, weight),
                                       atol=1e-4, rtol=1e-5)
    x = torch.randn(2, 24, generator=generator)
    with torch.no_grad():
        weight.mul_(-2)  # in place: the cached panels must be remade
        torch.testing.assert_close(kernels.linear(x, weight), F.linear(x, weight),
                                   atol=1e-4, rtol=1e-5)
    # autograd and other dtypes take F.linear (gradients flow)
    trained = torch.randn(40, 24, requires_grad=True)
    kernels.linear(x, trained).sum().backward()
    assert trained.grad is not None
    half = kernels.linear(x.bfloat16(), weight.bfloat16())
    assert half.dtype == torch.bfloat16
