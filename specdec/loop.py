"""The speculative decoding loop: draft a tree, verify it in one target forward, commit.

One step (see DESIGN.md):
  drafter.propose(state) -> DraftTree
  target forward over root + tree (tree mask, depth positions) -> logits [N + 1, V]
  verifier walks the tree -> accepted path + one recovered/bonus token
  commit the accepted path in the KV cache; drafter.observe(result); stats.record(result)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import drafters as drafter_registry
import verifiers as verifier_registry
from specdec import checks
from specdec.engine.cost import make_budget
from specdec.sampling import SamplingConfig
from specdec.state import DecodingState, GenerationStats, StepResult
from specdec.target import TreeForward, context_length, target_vocab_size
from specdec.timing import clock
from specdec.tree import DraftTree
from verifiers.base import walk_tree


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [1, prompt + new]
    stats: GenerationStats

    @property
    def new_token_ids(self) -> list[int]:
        return self.sequences[0, self.stats.prompt_tokens:].tolist()


def next_node_budget(hint: int | None, drafted: int, kept: int) -> int | None:
    """The drafter's next ``DecodingState.node_budget``: the kept size when the budget cut the
    tree; when it kept a tree drafted under a hint whole, twice that size (the tree grows back
    geometrically while it pays, instead of a full-size draft every other step that the budget
    would mostly throw away); None while nothing is cut."""
    if kept < drafted:
        return kept
    if hint is not None:
        return max(1, 2 * kept)
    return None


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    if torch.is_tensor(eos_token_id):
        return set(eos_token_id.reshape(-1).tolist())
    return set(int(t) for t in eos_token_id)


def _check_prompt(model, input_ids, max_new_tokens: int) -> list[int]:
    if not torch.is_tensor(input_ids):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [1, L], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"batch size {input_ids.shape[0]} is not supported yet: speculative decoding runs one "
            f"sequence at a time, so call it once per prompt"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token (e.g. the BOS token)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    prompt_len = int(input_ids.shape[1])
    context = context_length(model.config)
    if context is not None:
        if prompt_len > context:
            raise ValueError(
                f"the prompt has {prompt_len} tokens, longer than the model's context of {context}: "
                f"truncate the prompt"
            )
        # the last emitted token is never fed back, so it needs no position
        if prompt_len + max_new_tokens - 1 > context:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {context}: lower max_new_tokens to at most "
                f"{context - prompt_len + 1}"
            )
    return input_ids[0].tolist()


def speculative_generate(model, input_ids, *, drafter, verifier, max_new_tokens: int,
                         temperature: float = 0.0, top_k: int | None = None,
                         top_p: float | None = None, eos_token_id=checks.MODEL_DEFAULT,
                         generator: torch.Generator | None = None, streamer=None,
                         tree_budget=None, stopping_criteria=None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [1, L] with speculative decoding.

    ``drafter`` and ``verifier`` are names (``drafters.available()``, ``verifiers.available()``)
    or objects. With a lossless verifier the output is distributed exactly as the target's own
    sampling with the same temperature / top-k / top-p (token-for-token equal at temperature 0).
    Generation stops right after an ``eos_token_id`` token (by default the model's
    ``generation_config.eos_token_id``, as ``model.generate``; None: no EOS) or at
    ``max_new_tokens``, or on the first token at which ``stopping_criteria`` (``transformers``
    stopping criteria, called with ``scores=None``) is true.
    ``tree_budget``: ``"auto"`` (or a `specdec.engine.cost.TreeBudget`, or a `LatencyProfile`) prunes
    every drafted tree to the size that maximises expected tokens per second under the target's
    measured latency (``"auto"`` measures it on first use per model/device and caches it); the
    choices are reported in ``stats.extra["tree_budget"]``.
    """
    drafter, verifier, eos_token_id = checks.validate_call(model, input_ids, drafter, verifier,
                                                           eos_token_id)
    prompt = _check_prompt(model, input_ids, max_new_tokens)
    drafter = drafter_registry.get(drafter)
    verifier = verifier_registry.get(verifier)
    sampling = SamplingConfig(temperature, top_k, top_p)
    if getattr(verifier, "greedy_only", False) and not sampling.greedy:
        raise ValueError(
            f"verifier {type(verifier).__name__} decodes greedily, but temperature={temperature}: "
            f"use verifier 'exact' to sample, or temperature=0"
        )
    device = next(model.parameters()).device
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
    elif generator.device.type != device.type:
        raise ValueError(
            f"the generator is on {generator.device} but the model on {device}: create it with "
            f"torch.Generator(device={str(device)!r})"
        )
    eos = _eos_set(eos_token_id)
    vocab_size = target_vocab_size(model)
    budget = make_budget(tree_budget, model)
    # a reused budget keeps its history; this generation's choices start here
    first_choice = len(budget.history) if budget is not None else 0
    propose_time = 0.0  # summed over the steps, for the budget's running mean
    want_hidden = bool(getattr(drafter, "needs_hidden_states", False)
                       or getattr(verifier, "needs_hidden_states", False))

    stats = GenerationStats(prompt_tokens=len(prompt))
    if streamer is not None:
        streamer.put(torch.tensor([prompt]))
    start = clock(device)
    target = TreeForward(model, output_hidden_states=want_hidden)
    prefill = target.prefill(torch.tensor(prompt[:-1], dtype=torch.long))
    context = target.max_positions
    state = DecodingState(tokens=list(prompt), prompt_length=len(prompt), vocab_size=vocab_size,
                          sampling=sampling, generator=generator, max_new_tokens=max_new_tokens,
                          device=device, target=model)
    if want_hidden and prefill is not None:
        # the prompt but its last token: the last row predicted the root, as after any step
        state.hidden_states = prefill.hidden_states
    if hasattr(drafter, "begin"):
        drafter.begin(state)
    if hasattr(verifier, "begin"):  # e.g. a judge head checks it was trained for this target
        verifier.begin(state)
    stats.prefill_time = clock(device) - start

    finished = False
    while not finished:
        t0 = clock(device)
        tree = checks.proposed(drafter, state)
        tree.validate(vocab_size)
        depth_limit = state.remaining - 1
        if context is not None:
            depth_limit = min(depth_limit, context - target.length - 1)
        tree = tree.truncate_depth(max(depth_limit, 0))
        if budget is not None:
            # the mean, not this step's time: one slow propose (a GC pause, a busy core) must
            # not make the budget think verifying is relatively cheap
            propose_time += clock(device) - t0
            drafted = len(tree)
            tree = budget.choose(tree, propose_time / (state.step + 1))
            state.node_budget = next_node_budget(state.node_budget, drafted, len(tree))
        t1 = clock(device)
        out = target.verify(state.tokens[-1], tree)
        t2 = clock(device)

        def target_probs_of(row: int) -> torch.Tensor:  # [V]
            return sampling.probs(out.logits[row])

        context_of = None
        if out.hidden_states is not None:
            last_hidden = out.hidden_states[-1]  # [N + 1, H]

            def context_of(node: int, children: list[int]) -> dict:
                return {"parent_hidden": last_hidden[node + 1],
                        "children_hidden": last_hidden[[c + 1 for c in children]]}

        accepted, token = walk_tree(verifier, tree, target_probs_of, generator, context_of)
        emitted = [tree.tokens[n] for n in accepted] + [token]
        for i, tok in enumerate(emitted):
            if tok in eos:
                emitted, finished = emitted[: i + 1], True
                break
        if len(emitted) >= state.remaining:
            emitted, finished = emitted[: state.remaining], True
        if stopping_criteria is not None:
            emitted, finished = checks.cut_at_stop(stopping_criteria, state.tokens, emitted, finished)
        accepted = accepted[: len(emitted)]

        target.commit_path(accepted)
        if want_hidden:
            rows = [0] + [n + 1 for n in accepted]
            state.hidden_states = tuple(h[rows] for h in out.hidden_states)
        state.tokens.extend(emitted)
        state.step += 1
        result = StepResult(tree, accepted, emitted, draft_time=t1 - t0, target_time=t2 - t1)
        stats.record(result)
        if budget is not None:
            budget.observe(result)
        if hasattr(drafter, "observe"):
            drafter.observe(result)
        if streamer is not None:
            streamer.put(torch.tensor(emitted))
    if streamer is not None:
        streamer.end()
    if budget is not None:
        stats.extra["tree_budget"] = budget.summary(since=first_choice)
    stats.new_tokens = state.new_tokens
    stats.total_time = clock(device) - start
    return GenerationOutput(torch.tensor([state.tokens], dtype=torch.long), stats)


__all__ = ["DraftTree", "GenerationOutput", "speculative_generate"]
