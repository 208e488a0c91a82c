"""The judge head's labelling run: batched greedy decoding continued from slices of a KV cache,
the resumable label cache and the fit (verifiers/judge_train.py), on tiny random models."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from verifiers.judge_train import LabelCache, fit_head, greedy_batch, swaps_for_answer


def reference_greedy(model, ids: torch.Tensor, budget: int, eos: int) -> torch.Tensor:
    out = model.generate(ids[None], do_sample=False, max_new_tokens=budget, pad_token_id=eos,
                         eos_token_id=eos)
    return out[0, len(ids):]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_batch_and_continuations_from_cache_slices_match_generate(arch):
    model = tiny_model(arch, scale=4.0)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 96, (n,), generator=generator) for n in (5, 9, 3)]
    budgets = [20, 12, 16]
    # an EOS that the first row produces early, so one row finishes while the others go on
    eos = int(greedy_batch(model, prompts, budgets, 95)["tokens"][0][4])
    answers = greedy_batch(model, prompts, budgets, eos, ranks=5)
    for i, prompt in enumerate(prompts):
        expected = reference_greedy(model, prompt, budgets[i], eos)
        assert torch.equal(answers["tokens"][i], expected)
        assert answers["finished"][i] == (int(expected[-1]) == eos)
        assert answers["top_ids"][i].shape == (len(expected), 5)
        assert torch.equal(answers["top_ids"][i][:, 0], expected)  # greedy = the top choice
        # the cache holds the prompt and every new token but the last
        assert answers["cache"][i][0][0].shape[1] == len(prompt) + len(expected) - 1
    assert answers["finished"][0] and len(answers["tokens"][0]) <= 5

    # swaps: (question, offset in its answer, token), continued from the answer's cache sliced
    # to prompt + answer[:offset], in one batch of rows with different prefix lengths
    jobs = [(0, 2, 7), (1, 0, 50), (2, 10, 9), (1, 11, 33), (2, 0, eos)]
    jobs = [(q, min(offset, len(answers["tokens"][q]) - 1), token) for q, offset, token in jobs]
    continue_budgets = [10, 14, 6, 9, 3]
    prefixes = []
    for q, offset, _ in jobs:
        keep = len(prompts[q]) + offset
        prefixes.append([(keys[:, :keep], values[:, :keep]) for keys, values in answers["cache"][q]])
    continued = greedy_batch(model, [torch.tensor([token]) for *_, token in jobs],
                             continue_budgets, eos, prefixes=prefixes)
    for row, (q, offset, token) in enumerate(jobs):
        full = torch.cat([prompts[q], answers["tokens"][q][:offset], torch.tensor([token])])
        assert torch.equal(continued["tokens"][row],
                           reference_greedy(model, full, continue_budgets[row], eos))
        hidden = model(full[None], output_hidden_states=True).hidden_states[-1][0, -1]
        torch.testing.assert_close(continued["hidden"][row], hidden, atol=1e-5, rtol=1e-5)


def test_swaps_pick_plausible_second_choices_and_low_ranks():
    top_ids = torch.arange(50).repeat(6, 1) + 100 * torch.arange(6)[:, None]  # [6, 50]
    top_probs = torch.zeros(6, 50)
    top_probs[:, 0] = 0.9
    top_probs[[1, 4], 1] = 0.08  # only positions 1 and 4 have a plausible second choice
    swaps = swaps_for_answer(top_probs, top_ids, swaps=8, low_swaps=2, min_alternative=0.05,
                             generator=torch.Generator().manual_seed(0))
    second = [(offset, token) for offset, token, kind in swaps if kind == 0]
    low = [(offset, token) for offset, token, kind in swaps if kind == 1]
    assert second == [(1, 101), (4, 401)]
    assert len(low) == 2
    for offset, token in low:
        assert 2 <= token - 100 * offset < 50


def test_label_cache_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "examples.pt"
    cache = LabelCache(path, {"swaps": 2})
    cache.target = {"hidden_size": 4}
    cache.add(7, [(torch.ones(4), 1, 0), (torch.zeros(4), 0, 1)])
    cache.add(6, [])  # a question without labelled swaps is still done
    cache.seconds = 12.5
    cache.save()
    again = LabelCache(path, {"swaps": 2})
    assert sorted(again.done) == [6, 7] and again.target == {"hidden_size": 4}
    assert again.seconds == 12.5
    data = again.tensors()
    assert data["labels"].tolist() == [1.0, 0.0] and data["kind"].tolist() == [0, 1]
    with pytest.raises(SystemExit, match="settings"):
        LabelCache(path, {"swaps": 3})


def test_fit_head_separates_separable_labels():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 16, generator=generator) * 30 + 5  # large scale, like hidden states
    labels = (features[:, 3] > 5).float()
    data = {"question": torch.arange(400) // 10, "features": features, "labels": labels,
            "kind": torch.zeros(400, dtype=torch.long)}
    head, report = fit_head(data, [0.01, 1.0])
    assert report["held_out_accuracy"] > 0.9 and report["held_out_auc"] > 0.95
    assert report["examples"] == 400 and report["held_out_examples"] == 80
    with torch.no_grad():
        assert float(((head(features) > 0).float() == labels).float().mean()) > 0.9
