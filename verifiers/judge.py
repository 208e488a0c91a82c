"""Judge decoding: a small head on the target's hidden states rescues good-but-mismatched drafts.

Exact verification rejects a draft token whenever the target would rarely have produced it, even
when it is a perfectly valid continuation (a synonym, another correct code style). Judge Decoding
trains a tiny classifier on the target's own contextual embedding of each draft token (the last
hidden state at the draft token's position, computed by the verification forward anyway) to say
"this token is acceptable", and accepts on its word.

The rule: run the base rule first (`ExactRule`: lossless recursive rejection for sampled children;
greedy at temperature 0). If it accepts a child, done. If it rejects every child, the judge scores
each child; the best-scoring child with probability > ``threshold`` is accepted in place of the
recovered token. So the judge only ever adds acceptances.

The head sees ``context``: the verification forward's hidden states of the children, ``[k, H]``,
either as a tensor or as the ``{"children_hidden": [k, H], ...}`` dict the loop passes when the
target adapter returns hidden states. Without them the rule refuses to run (a judge that cannot
see is not a judge). Heads save and load as ``config.json`` + ``model.safetensors``.

What it relaxes: exactness, wherever the judge says yes; how much depends on the head and the
threshold (``threshold=1`` never rescues and is the base rule).

References:
    Bachmann et al. "Judge Decoding: Faster Speculative Sampling Requires Going Beyond Model
        Alignment". ICLR 2025. arXiv:2501.19309.
    Garipov et al. "AutoJudge: Judge Decoding Without Manual Annotation". 2025.
        arXiv:2504.20039. (labels from whether a swap changes the task's answer.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from verifiers.base import check_sampling
from verifiers.rejection import ExactRule

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_HEAD = "judge-smollm2"  # trained for the embedded model by verifiers/judge_train.py


def resolve_head(name_or_path: str | Path) -> Path:
    """A folder holding a saved head: a path, or the name of a shipped one in verifiers/weights/."""
    path = Path(name_or_path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (WEIGHTS_DIR / str(name_or_path) / CONFIG_NAME).is_file():
        return WEIGHTS_DIR / str(name_or_path)
    shipped = sorted(p.name for p in WEIGHTS_DIR.glob("*") if (p / CONFIG_NAME).is_file())
    raise FileNotFoundError(
        f"no judge head at {name_or_path!r}: give a folder with {CONFIG_NAME} and {WEIGHTS_NAME} "
        f"(python -m verifiers.judge_train --out DIR), or a shipped name: {', '.join(shipped) or 'none'}")


class JudgeHead(nn.Module):
    """Hidden state of a draft token -> logit that the token is acceptable.

    ``mlp_hidden=0`` is the linear head of Judge Decoding; a positive width adds one ReLU layer.
    """

    def __init__(self, hidden_size: int, mlp_hidden: int = 0):
        super().__init__()
        self.hidden_size, self.mlp_hidden = hidden_size, mlp_hidden
        if mlp_hidden > 0:
            self.net = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.ReLU(),
                                     nn.Linear(mlp_hidden, 1))
        else:
            self.net = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [..., H] -> [...]
        weight = next(self.parameters())
        return self.net(hidden_states.to(weight.device, weight.dtype)).squeeze(-1)

    target: dict | None = None  # fingerprint of the target it was trained on (drafters/trained.py)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"architecture": "JudgeHead", "hidden_size": self.hidden_size,
                  "mlp_hidden": self.mlp_hidden, **({"target": self.target} if self.target else {})}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  directory / WEIGHTS_NAME, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "JudgeHead":
        """A saved head: a folder, or a shipped name (``judge-smollm2``)."""
        directory = resolve_head(directory)
        config = json.loads((directory / CONFIG_NAME).read_text())
        head = cls(config["hidden_size"], config.get("mlp_hidden", 0))
        head.load_state_dict(load_file(directory / WEIGHTS_NAME))
        head.target = config.get("target")
        return head.eval()


def train_head(head: JudgeHead, hidden_states: torch.Tensor, labels: torch.Tensor, *,
               epochs: int = 200, lr: float = 1e-2, weight_decay: float = 0.0,
               positive_weight: float | None = None) -> list[float]:
    """Fit ``head`` on ``hidden_states [N, H]`` with 0/1 ``labels [N]`` (1 = acceptable).

    Full-batch AdamW (``weight_decay``: decoupled L2) on the weighted logistic loss (positives are
    rare among mismatches, so they are up-weighted to balance the classes unless
    ``positive_weight`` is given). Returns the loss per epoch.
    """
    labels = labels.float()
    if positive_weight is None:
        positives = float(labels.sum())
        positive_weight = (labels.numel() - positives) / max(positives, 1.0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(positive_weight))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    head.train()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = loss_fn(head(hidden_states), labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    head.eval()
    return losses


def _children_hidden(context) -> torch.Tensor:
    if isinstance(context, dict):
        context = context.get("children_hidden")
    if not torch.is_tensor(context):
        raise ValueError(
            "the judge rule needs the target's hidden states of the children as context "
            "(a [k, H] tensor or {'children_hidden': [k, H]}); use a target adapter that returns "
            "hidden states"
        )
    return context


class JudgeRule:
    lossless: ClassVar[bool] = False
    needs_hidden_states: ClassVar[bool] = True  # the loop then passes the children's hidden states
    supported: ClassVar[tuple[str, ...]] = ExactRule.supported

    def __init__(self, head: JudgeHead | str | Path = DEFAULT_HEAD, threshold: float = 0.8):
        if not isinstance(head, JudgeHead):
            head = JudgeHead.from_pretrained(head)
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold is a probability in [0, 1], got {threshold}")
        self.head, self.threshold = head.eval(), threshold
        self._base = ExactRule()

    def begin(self, state) -> None:
        """Called by the loop before generating: refuse a head trained for another target."""
        if self.head.target and state.target is not None:
            from drafters.trained import check_target
            check_target({"target": self.head.target}, state.target, "the judge head")

    @torch.no_grad()
    def scores(self, context) -> torch.Tensor:
        """[k] the judge's probability that each child is acceptable."""
        hidden = _children_hidden(context)  # [k, H]
        expected = getattr(self.head, "hidden_size", hidden.shape[-1])
        if hidden.shape[-1] != expected:
            raise ValueError(
                f"the judge head reads hidden states of size {expected}, but the target's have "
                f"{hidden.shape[-1]}: train a head for this target (python -m verifiers.judge_train)"
            )
        return torch.sigmoid(self.head(hidden).float().cpu())

    def rescued_child(self, draft_tokens, context) -> int:
        """The child the judge accepts after a rejection, or -1."""
        scores = self.scores(context)
        if scores.numel() != len(draft_tokens):
            raise ValueError(f"context has hidden states for {scores.numel()} children, "
                             f"but there are {len(draft_tokens)}")
        best = int(torch.argmax(scores))
        return best if float(scores[best]) > self.threshold else -1

    def select(self, target_probs, draft_tokens, draft_probs, *, sampling, generator, context=None):
        check_sampling(self, sampling, self.supported)
        rescued = self.rescued_child(draft_tokens, context)
        index, token = self._base.select(target_probs, draft_tokens, draft_probs,
                                         sampling=sampling, generator=generator)
        if index < 0 and rescued >= 0:
            return rescued, draft_tokens[rescued]
        return index, token

    def output_distribution(self, target_probs, draft_tokens, draft_probs, *, sampling,
                            context=None):
        """(accept_probs [k], recovered_probs [V]) of `select` given these drafts, exactly."""
        rescued = self.rescued_child(draft_tokens, context)
        accept_probs, recovered_probs = self._base.output_distribution(
            target_probs, draft_tokens, draft_probs, sampling=sampling)
        if rescued >= 0:
            accept_probs[rescued] += recovered_probs.sum()
            recovered_probs = torch.zeros_like(recovered_probs)
        return accept_probs, recovered_probs
