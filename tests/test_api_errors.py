"""The Python API: the wrapped ``generate`` honours or clearly refuses transformers' options, a
deep copy of a wrapped model uses its own weights, the default ``eos_token_id`` is the model's,
bad input gets one clear line, and lossy verifiers warn once per class."""

import copy
import string
import warnings

import pytest
import torch
import transformers

import specdec
from conftest import tiny_model
from drafters.base import DrafterBase
from specdec import checks, speculative_generate
from specdec.errors import UsageError

PROMPT = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


def fresh_target(seed: int = 0):
    model = tiny_model("llama", seed=seed, scale=4.0)
    model.generation_config.eos_token_id = None  # the config's default (2) would stop early
    return model


def plain(model, input_ids, max_new_tokens, **kw):
    """transformers' own greedy ``generate``, whether or not ``model`` is wrapped."""
    with torch.no_grad():
        return type(model).generate(model, input_ids, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=0,
                                    attention_mask=torch.ones_like(input_ids), **kw)


@pytest.fixture
def wrapped():
    return specdec.wrap(fresh_target(), drafter="pld", verifier="greedy")


# ---------------------------------------------------------------- copies

def test_a_deep_copy_generates_with_its_own_weights(wrapped):
    clone = copy.deepcopy(wrapped)
    with torch.no_grad():
        clone.get_output_embeddings().weight.copy_(
            fresh_target(seed=5).get_output_embeddings().weight)
    ours, theirs = plain(wrapped, PROMPT, 20), plain(clone, PROMPT, 20)
    assert ours.tolist() != theirs.tolist()  # the copy's weights really differ
    assert clone.generate(PROMPT, max_new_tokens=20).tolist() == theirs.tolist()
    assert wrapped.generate(PROMPT, max_new_tokens=20).tolist() == ours.tolist()
    assert specdec.last_stats(clone) is not specdec.last_stats(wrapped)
    specdec.unwrap(clone)
    assert clone.generate(PROMPT, max_new_tokens=20, do_sample=False,
                          attention_mask=torch.ones_like(PROMPT)).tolist() == theirs.tolist()


# ---------------------------------------------------------------- generate options

def char_tokenizer():
    """A tokenizer whose 96 tokens are single characters, for the tiny models' vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = string.ascii_letters + string.digits + string.punctuation + "éß"
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)


def test_stop_strings_stop_where_generate_stops(wrapped):
    tokenizer = char_tokenizer()
    free = plain(wrapped, PROMPT, 30)[0, PROMPT.shape[1]:].tolist()
    stop = tokenizer.decode(free[9:11])
    reference = plain(wrapped, PROMPT, 30, stop_strings=stop, tokenizer=tokenizer)
    assert reference.shape[1] < PROMPT.shape[1] + 30  # the string stopped it
    out = wrapped.generate(PROMPT, max_new_tokens=30, stop_strings=stop, tokenizer=tokenizer)
    assert out.tolist() == reference.tolist()
    assert tokenizer.decode(out[0, PROMPT.shape[1]:]).endswith(stop)
    with pytest.raises(UsageError, match="stop_strings needs the tokenizer"):
        wrapped.generate(PROMPT, max_new_tokens=30, stop_strings=stop)


class StopAfter(transformers.StoppingCriteria):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_stopping_criteria_and_max_time_stop_where_generate_stops(wrapped):
    free = plain(wrapped, PROMPT, 30)[0, PROMPT.shape[1]:].tolist()
    token = free[7]
    criteria = transformers.StoppingCriteriaList([StopAfter(token)])
    reference = plain(wrapped, PROMPT, 30, stopping_criteria=criteria)
    out = wrapped.generate(PROMPT, max_new_tokens=30, stopping_criteria=criteria)
    assert out.tolist() == reference.tolist()
    assert out[0, -1] == token and out.shape[1] < PROMPT.shape[1] + 30
    # max_time=0: the time is up after the first token, in both
    reference = plain(wrapped, PROMPT, 30, max_time=0.0)
    out = wrapped.generate(PROMPT, max_new_tokens=30, max_time=0.0)
    assert out.tolist() == reference.tolist() and out.shape[1] == PROMPT.shape[1] + 1


def test_return_dict_and_per_step_outputs(wrapped):
    reference = plain(wrapped, PROMPT, 12)
    out = wrapped.generate(PROMPT, max_new_tokens=12, return_dict_in_generate=True)
    assert out.sequences.tolist() == reference.tolist()
    for option in ("output_scores", "output_logits"):
        with pytest.raises(UsageError, match=f"{option}=True is not supported"):
            wrapped.generate(PROMPT, max_new_tokens=12, return_dict_in_generate=True,
                             **{option: True})


def test_transformers_speculative_modes_point_to_drafters(wrapped):
    with pytest.raises(UsageError, match=r"assistant_model .*drafters.get\('small-lm'"):
        wrapped.generate(PROMPT, max_new_tokens=5, assistant_model=fresh_target(seed=1))
    with pytest.raises(UsageError, match="prompt_lookup_num_tokens .*'pld' drafter"):
        wrapped.generate(PROMPT, max_new_tokens=5, prompt_lookup_num_tokens=3)


def test_unknown_arguments_are_refused_and_harmless_ones_accepted(wrapped):
    with pytest.raises(UsageError, match=r"unknown generate arguments \['colour'\]"):
        wrapped.generate(PROMPT, max_new_tokens=5, colour="red")
    with pytest.raises(UsageError, match="logits_processor is not supported"):
        wrapped.generate(PROMPT, max_new_tokens=5, logits_processor=[lambda ids, s: s])
    with pytest.raises(UsageError, match="generate needs input_ids"):
        wrapped.generate(max_new_tokens=5)
    padded = torch.ones_like(PROMPT)
    padded[0, 0] = 0
    with pytest.raises(UsageError, match="the attention_mask has padding"):
        wrapped.generate(PROMPT, attention_mask=padded)
    out = wrapped.generate(PROMPT, max_new_tokens=12, synced_gpus=False, use_cache=True,
                           pad_token_id=0)
    assert out.tolist() == plain(wrapped, PROMPT, 12).tolist()


# ---------------------------------------------------------------- wrap time

def test_wrap_checks_its_arguments():
    model = fresh_target()
    with pytest.raises(UsageError, match="unknown drafter 'nope'; valid names: .*pld.*trie"):
        specdec.wrap(model, drafter="nope")
    with pytest.raises(UsageError, match="unknown verifier 'nope'; valid names: .*exact.*greedy"):
        specdec.wrap(model, drafter="pld", verifier="nope")
    with pytest.raises(UsageError, match=r"unknown options \['min_ngram'\]: it takes tree_budget"):
        specdec.wrap(model, drafter="pld", min_ngram=1)
    with pytest.raises(UsageError, match="drafter 'small-lm' cannot be built from its name alone"):
        specdec.wrap(model, drafter="small-lm")
    with pytest.raises(UsageError, match="the drafter must be a name .* or an object with propose"):
        specdec.wrap(model, drafter=42)
    with pytest.raises(UsageError, match="must be a Hugging Face causal LM"):
        specdec.wrap(object(), drafter="pld")
    assert not hasattr(model, "_specdec_generate")  # nothing was wrapped


# ---------------------------------------------------------------- speculative_generate

def test_the_default_eos_is_the_models_own():
    target = fresh_target()
    free = plain(target, PROMPT, 30)[0, PROMPT.shape[1]:].tolist()
    eos = free[10]
    target.generation_config.eos_token_id = eos
    with torch.no_grad():  # transformers' default, too
        reference = target.generate(PROMPT, max_new_tokens=30, do_sample=False, pad_token_id=0,
                                    attention_mask=torch.ones_like(PROMPT))
    out = speculative_generate(target, PROMPT, drafter="pld", verifier="greedy",
                               max_new_tokens=30)
    assert out.sequences.tolist() == reference.tolist()
    assert out.new_token_ids[-1] == eos and len(out.new_token_ids) < 30
    unstopped = speculative_generate(target, PROMPT, drafter="pld", verifier="greedy",
                                     max_new_tokens=30, eos_token_id=None)
    assert unstopped.new_token_ids == free


class ReturnsNone(DrafterBase):
    def propose(self, state):
        return None


def test_bad_input_gets_one_clear_line():
    target = fresh_target()

    def run(model=target, prompt=PROMPT, **kw):
        args = dict(drafter="pld", verifier="greedy", max_new_tokens=4)
        args.update(kw)
        return speculative_generate(model, prompt, **args)

    with pytest.raises(TypeError, match="drafter ReturnsNone.propose returned None; propose "
                                        "must return a DraftTree"):
        run(drafter=ReturnsNone())
    for model in (object(), torch.nn.Linear(3, 3)):
        with pytest.raises(UsageError, match="must be a Hugging Face causal LM .* got "
                                             f"{type(model).__name__}"):
            run(model=model)
    with pytest.raises(UsageError, match=r"prompt token id 96 \(position 1\) is outside the "
                                         "model's vocabulary of 96 tokens"):
        run(prompt=[[1, 96, 3]])
    with pytest.raises(UsageError, match=r"prompt token id -1 \(position 0\)"):
        run(prompt=[[-1, 4]])
    with pytest.raises(UsageError, match="eos_token_id must be a token id .* got the string "
                                         "'</s>'"):
        run(eos_token_id="</s>")
    with pytest.raises(UsageError, match=r"eos_token_id must be a token id .* got \[2.5\]"):
        run(eos_token_id=[2.5])
    with pytest.raises(UsageError, match="input_ids must hold integer token ids, got dtype "
                                         "torch.float32"):
        run(prompt=PROMPT.float())
    with pytest.raises(UsageError, match="the prompt is empty"):
        run(prompt=[[]])


def test_a_lossy_verifier_warns_once_per_class(monkeypatch):
    import verifiers

    monkeypatch.setattr(checks, "_WARNED", set())
    target = fresh_target()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for verifier in ("typical", "typical", "exact", "greedy", "bild"):
            speculative_generate(target, PROMPT, drafter="pld", verifier=verifier,
                                 max_new_tokens=3)
        speculative_generate(target, PROMPT, drafter="pld",
                             verifier=verifiers.get("typical"), max_new_tokens=3)
    lossy = [str(w.message) for w in caught if w.category is checks.LossyVerifierWarning]
    assert len(lossy) == 2
    assert lossy[0].startswith("verifier TypicalRule is lossy")
    assert lossy[1].startswith("verifier BiLDRule is lossy")
