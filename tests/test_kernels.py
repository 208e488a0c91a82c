"""specdec.engine.kernels: the skinny-GEMM kernel computes F.linear (every row count, partial
panels, biases, one or two threads), refuses bad input clearly, and can be switched off or fail
to build without breaking the fast path (which then uses MKL's packed GEMM or F.linear);
specdec.engine.backends: every backend of `Linear` computes F.linear, `linear` serves drafters'
products from panels it remakes when the weight changes (`Snapshot`). The kernel is built by the
tests that need it (the ``native_kernels`` fixture), never at collection."""

import re

import pytest
import torch
import torch.nn.functional as F

from conftest import require_kernels, tiny_model
from specdec.engine import backends, fastpath, kernels
from specdec.engine.backends import BACKENDS, KERNEL_MAX, Linear, choose, linear, mkl_available
from specdec.engine.snapshot import Snapshot

needs_kernel = pytest.mark.usefixtures("native_kernels")


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
        panels = kernels.pack(weight)
        for b in (None, bias):
            for rows in (1, 2, 3, 7, 8, 9, 16, 17, 33, 70):
                x = torch.randn(rows, shape[1], generator=generator)
                got = kernels.native().skinny_linear(x, panels, b, shape[0])
                assert got.shape == (rows, shape[0]) and got.dtype == torch.float32
                torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-4, rtol=1e-5)
        # a non-contiguous input (a column slice of a wider tensor) is read correctly
        wide = torch.randn(5, shape[1] * 2, generator=generator)
        x = wide[:, ::2]
        torch.testing.assert_close(Linear(weight, None, "kernel")(x), F.linear(x, weight),
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
    with torch.no_grad():  # linear caches panels per precision
        x = torch.randn(3, shape[1], generator=generator)
        torch.testing.assert_close(linear(x, weight, precision=torch.bfloat16),
                                   F.linear(x, rounded), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight),
                                   atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="float32, bfloat16 or int8"):
        kernels.pack(weight, torch.float16)


@needs_kernel
def test_profile_key_names_the_kernel_build(monkeypatch):
    """A latency profile measured with one build of the kernel is not reused with another (a
    changed source or another CPU)."""
    from specdec.engine.cost import profile_key

    model = tiny_model("llama")
    assert fastpath.kernel_wanted(model)
    before = profile_key(model, 16)["kernel"]
    assert kernels.build_id() in before
    monkeypatch.setattr(kernels, "_host_signature", lambda: "another-cpu")
    assert profile_key(model, 16)["kernel"] != before


@needs_kernel
def test_kernel_refuses_mismatched_input():
    panels = kernels.pack(torch.randn(32, 8))
    product = kernels.native().skinny_linear
    with pytest.raises(RuntimeError, match="x has 9 columns, the weight 8"):
        product(torch.randn(2, 9), panels, None, 32)
    with pytest.raises(RuntimeError, match="2-D float32 CPU tensor"):
        product(torch.randn(2, 8, dtype=torch.float64), panels, None, 32)
    with pytest.raises(RuntimeError, match="bias must be float32 with 32 elements"):
        product(torch.randn(2, 8), panels, torch.randn(31), 32)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    assert not kernels.enabled() and not kernels.available()
    model = tiny_model("llama", scale=3.0)
    fast = fastpath.FastForward(model)
    assert fast.kernel is False and fast.pack == mkl_available()
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
        Linear(torch.randn(4, 4), None, "kernel")
    x = torch.randn(2, 4)
    with torch.no_grad():  # drafters' products take F.linear
        torch.testing.assert_close(linear(x, torch.eye(4)), x)


@needs_kernel
def test_kernel_linear_routes_rows_to_the_kernel_only_in_its_range(monkeypatch):
    weight, bias = torch.randn(48, 16), torch.randn(48)
    assert choose(weight, kernel=True, pack=True) == "kernel"  # one fast copy, not two
    layer = Linear(weight, bias, "kernel")
    calls = []
    original = layer._product
    monkeypatch.setattr(layer, "_product", lambda x, m: calls.append(m) or original(x, m))
    for rows in (1, KERNEL_MAX, KERNEL_MAX + 1):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(layer(x), F.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
    assert calls == [1, KERNEL_MAX]


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


@needs_kernel
def test_linear_equals_f_linear_and_follows_weight_changes():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 24, generator=generator)
    for shape in ((1, 24), (3, 5, 24), (kernels.MAX_ROWS + 1, 24)):
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            torch.testing.assert_close(linear(x, weight), F.linear(x, weight),
                                       atol=1e-4, rtol=1e-5)
    x = torch.randn(2, 24, generator=generator)
    with torch.no_grad():
        weight.mul_(-2)  # in place: the cached panels must be remade
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight),
                                   atol=1e-4, rtol=1e-5)
        bias = torch.zeros(40)
        linear(x, weight, bias)
        bias.add_(1.5)  # a bias written in place is seen too
        torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias),
                                   atol=1e-4, rtol=1e-5)
    # autograd and other dtypes take F.linear (gradients flow)
    trained = torch.randn(40, 24, requires_grad=True)
    linear(x, trained).sum().backward()
    assert trained.grad is not None
    half = linear(x.bfloat16(), weight.bfloat16())
    assert half.dtype == torch.bfloat16


@needs_kernel
def test_linear_drops_the_panels_of_a_dead_weight():
    weight = torch.randn(40, 24)
    with torch.no_grad():
        linear(torch.randn(2, 24), weight)
    key = (id(weight), torch.float32)
    assert key in backends._CACHE
    del weight
    assert key not in backends._CACHE


def test_snapshot_sees_replaced_moved_and_modified_tensors():
    module = torch.nn.Linear(8, 4)
    snapshot = Snapshot([module.weight, module.bias])
    assert snapshot.matches([module.weight, module.bias])
    assert not snapshot.matches([module.weight])  # another list of tensors
    with torch.no_grad():
        module.bias.add_(1.0)  # in place (a training step)
    assert not snapshot.matches([module.weight, module.bias])
    snapshot = Snapshot([module.weight, module.bias])
    module.weight = torch.nn.Parameter(module.weight.detach().clone())  # replaced
    assert not snapshot.matches([module.weight, module.bias])
    snapshot = Snapshot([module.weight])
    module.to(torch.float64)  # moved: new storage under the same parameter
    assert not snapshot.matches([module.weight])
    assert Snapshot([module.weight]).matches([module.weight])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_computes_f_linear_for_every_row_count(backend):
    if backend == "kernel":
        require_kernels()
    if backend == "mkl" and not mkl_available():
        pytest.skip("MKL packing needs PyTorch built with MKL")
    generator = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    for b in (None, bias):
        layer = Linear(weight, b, backend)
        assert layer.backend == backend and (layer.copy is None) == (backend == "torch")
        for shape in ((1, 24), (4, 24), (12, 24), (13, 24), (70, 24), (2, 3, 24)):
            x = torch.randn(*shape, generator=generator)
            torch.testing.assert_close(layer(x), F.linear(x, weight, b), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        Linear(weight, None, "blas")
    if backend != "kernel":
        with pytest.raises(ValueError, match="need the kernel backend"):
            Linear(weight, None, backend, torch.bfloat16)


def test_missing_build_tools_are_named_before_building(monkeypatch):
    """Without a C++ compiler or ninja the build is not attempted, and the reason says which."""
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in kernels.missing_tool()
    monkeypatch.setattr(kernels, "_state", {})
    assert not kernels.available()
    assert "no C++ compiler" in kernels.load_error()
    monkeypatch.setattr(kernels.shutil, "which",
                        lambda name: None if name == "ninja" else f"/usr/bin/{name}")
    assert "no ninja" in kernels.missing_tool()
