"""The transposed-weight layout for multi-token forwards (specdec/engine/gemm.py): same outputs as the
stock nn.Linear path, active only inside `active(n >= 2)`, restored afterwards, and chosen
automatically only for float32 models on CPU."""

import pytest
import torch
from torch import nn

from conftest import ARCHS, tiny_model
from specdec.engine import gemm
from specdec.target import TreeForward
from specdec.tree import DraftTree


def _patched(model) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is nn.Linear and "forward" in m.__dict__]


@pytest.mark.parametrize("arch", ARCHS)
def test_transposed_forward_equals_stock_and_is_restored(arch):
    model = tiny_model(arch)
    linears = gemm.TransposedLinears(model)
    assert linears.modules, "a causal LM has linear layers (at least its head)"
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(ids).logits
        with linears.active(7):
            assert _patched(model) == linears.modules
            transposed = model(ids).logits
    assert _patched(model) == []  # model.generate and everything else see the stock modules
    torch.testing.assert_close(transposed, stock, atol=1e-5, rtol=1e-5)
    for n in range(1, gemm.MIN_TOKENS):  # 1-3 rows keep the stock path (as fast there)
        with linears.active(n):
            assert _patched(model) == []


def test_restored_after_an_error_and_recopied_after_a_weight_change():
    model = tiny_model("llama")
    linears = gemm.TransposedLinears(model)
    with pytest.raises(RuntimeError, match="boom"):
        with linears.active(4):
            raise RuntimeError("boom")
    assert _patched(model) == []
    head = model.lm_head
    x = torch.randn(5, head.in_features)
    with torch.no_grad(), linears.active(5):
        before = head(x)
    with torch.no_grad():
        head.weight.mul_(2.0)  # a training step or load_state_dict
        with linears.active(5):
            after = head(x)
    torch.testing.assert_close(after, 2.0 * before)


def test_modules_with_their_own_forward_are_left_alone():
    model = tiny_model("llama")
    hooked = model.lm_head
    own = hooked.forward
    hooked.forward = lambda x: own(x)  # as accelerate's offload hooks do
    linears = gemm.TransposedLinears(model)
    assert hooked not in linears.modules
    with linears.active(5):
        assert hooked.__dict__["forward"] is not None
    assert "forward" in hooked.__dict__  # still theirs afterwards


def test_auto_only_for_float32_on_cpu_and_the_environment_overrides(monkeypatch):
    monkeypatch.delenv(gemm.ENV, raising=False)
    model = tiny_model("llama")
    assert gemm.turned_on(model, "auto") and gemm.turned_on(model, None)
    assert not gemm.turned_on(model, False) and gemm.turned_on(model, True)
    assert not gemm.turned_on(tiny_model("llama").to(torch.bfloat16), "auto")
    monkeypatch.setattr(gemm, "AUTO_MAX_BYTES", 16)
    assert not gemm.turned_on(model, "auto")  # too big to hold a second copy of the weights
    monkeypatch.setenv(gemm.ENV, "1")
    assert gemm.turned_on(model, "auto")
    monkeypatch.setenv(gemm.ENV, "0")
    assert not gemm.turned_on(model, "auto") and gemm.turned_on(model, True)
    assert TreeForward(model, fastpath=False).linears is None
    assert TreeForward(model, fastpath=False, transposed_gemm=True).linears is not None
    assert TreeForward(model).linears is None  # the fast path (engine/fastpath.py) replaces it
    monkeypatch.setenv(gemm.ENV, "yes")
    with pytest.raises(ValueError, match="SPECDEC_TRANSPOSED_GEMM must be 0 or 1"):
        gemm.turned_on(model, "auto")
    with pytest.raises(ValueError, match="transposed_gemm must be"):
        gemm.turned_on(model, "fast")


@pytest.mark.parametrize("arch", ARCHS)
def test_tree_verify_agrees_with_and_without_the_layout(arch):
    model = tiny_model(arch)
    prompt = torch.tensor([3, 17, 42, 5, 9])
    tree = DraftTree([5, 7, 9, 11, 13, 2], [-1, -1, 0, 0, 2, 1])
    outputs = []
    for setting in (False, True):
        fwd = TreeForward(model, transposed_gemm=setting, fastpath=False)
        assert (fwd.linears is not None) == setting
        fwd.prefill(prompt)
        outputs.append(fwd.verify(11, tree).logits)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outputs[1].argmax(-1), outputs[0].argmax(-1))
