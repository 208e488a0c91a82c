"""The conformance table: every drafter x every token verifier, in one parametrized test.

At temperature 0 a lossless rule must reproduce ``model.generate(do_sample=False)`` token for
token; a lossy rule must produce exactly ``max_new_tokens`` valid tokens; a rule that does not
support the drafter's sampling kind must say so with a ValueError. At temperature 1 every pair
runs with the same checks on validity. A new algorithm joins by adding a row.
"""

import pytest
import torch

import drafters
import verifiers
from conftest import perturbed_copy, tiny_model
from drafters.train import build_trainable, default_aux_layers
from specdec import speculative_generate
from verifiers.judge import JudgeHead

VOCAB = 96
SMALL_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


@pytest.fixture(scope="module")
def target():
    model = tiny_model("llama", vocab=VOCAB, scale=4.0, tie_word_embeddings=True)
    model.generation_config.eos_token_id = None
    return model


def trained(kind, name=None, **drafter_options):
    """A drafter of trainable ``kind`` (fresh weights), built as ``name`` (default: kind)."""
    def make(target):
        torch.manual_seed(0)
        module = build_trainable(kind, target, torch.arange(64), heads=3, layers=1,
                                 aux_layers=default_aux_layers(target))
        if kind == "distilled":
            return drafters.get("distilled", weights=module, depth=3, branching=[2, 1, 1])
        return drafters.get(name or kind, weights=module, **(drafter_options or {"tree": SMALL_TREE}))
    return make


DRAFTERS = {
    "none": lambda t: drafters.get("none"),
    "pld": lambda t: drafters.get("pld"),
    "trie": lambda t: drafters.get("trie"),
    "small-lm": lambda t: drafters.get("small-lm", model=perturbed_copy(t, 0.02), depth=3),
    "small-lm-iid-tree": lambda t: drafters.get("small-lm", model=perturbed_copy(t, 0.02),
                                                depth=2, branching=[3, 1], mode="iid"),
    "small-lm-wor-tree": lambda t: drafters.get("small-lm", model=perturbed_copy(t, 0.02),
                                                depth=2, branching=[3, 2],
                                                mode="without_replacement"),
    "union": lambda t: drafters.get("union", members=[
        "pld", drafters.get("small-lm", model=perturbed_copy(t, 0.02), depth=3)]),
    "quantized": lambda t: drafters.get("quantized", depth=3),
    "quantized-int8-iid": lambda t: drafters.get("quantized", depth=3, precision="int8",
                                                 mode="iid"),
    "medusa": trained("medusa"),
    "hydra": trained("hydra"),
    "hydra++": trained("hydra++"),
    "distilled": trained("distilled"),
    "eagle": trained("eagle"),
    "eagle2": trained("eagle", "eagle2", depth=3, top_k=3, beam=2, max_nodes=6),
    "eagle3": trained("eagle3", "eagle3", depth=3, top_k=3, beam=2, max_nodes=6),
    "falcon": trained("falcon", "falcon", widths=[2, 2], passes=2, beam=2, max_nodes=8),
}

VERIFIERS = {
    "greedy": lambda t: verifiers.get("greedy"),
    "exact": lambda t: verifiers.get("exact"),
    "spectr": lambda t: verifiers.get("spectr"),
    "optimal": lambda t: verifiers.get("optimal"),
    "typical": lambda t: verifiers.get("typical"),
    "lantern": lambda t: verifiers.get("lantern", embeddings=t.get_input_embeddings().weight),
    "judge": lambda t: verifiers.get("judge", head=JudgeHead(t.config.hidden_size)),
    "bild": lambda t: verifiers.get("bild"),
}


def test_the_table_covers_every_registered_name():
    assert set(verifiers.available()) - set(VERIFIERS) == {"continuous"}  # not a token rule
    assert set(DRAFTERS) >= set(drafters.available())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("verifier_name", VERIFIERS)
@pytest.mark.parametrize("drafter_name", DRAFTERS)
def test_pair(target, drafter_name, verifier_name, temperature):
    prompt = torch.tensor([[2, 7, 1, 8, 2, 8, 1, 8, 2, 8]])
    drafter = DRAFTERS[drafter_name](target)
    verifier = VERIFIERS[verifier_name](target)
    if temperature > 0 and getattr(verifier, "greedy_only", False):
        with pytest.raises(ValueError, match="decodes greedily"):
            speculative_generate(target, prompt, drafter=drafter, verifier=verifier,
                                 max_new_tokens=4, temperature=temperature)
        return
    try:
        out = speculative_generate(target, prompt, drafter=drafter, verifier=verifier,
                                   max_new_tokens=24, temperature=temperature,
                                   generator=torch.Generator().manual_seed(0))
    except ValueError as err:
        assert "does not support sampling" in str(err)
        assert not set(getattr(verifier, "supported", ())) >= {"iid", "without_replacement",
                                                               "deterministic"}
        return
    new = out.new_token_ids
    assert len(new) == 24 and all(0 <= t < VOCAB for t in new)
    if temperature == 0 and verifier.lossless:
        with torch.no_grad():
            reference = target.generate(prompt, max_new_tokens=24, do_sample=False,
                                        attention_mask=torch.ones_like(prompt), pad_token_id=0)
        assert out.sequences.tolist() == reference.tolist()
