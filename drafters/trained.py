"""Plumbing shared by the trained drafters (Medusa, Hydra, Hydra++, the distilled small LM).

- **Reduced draft vocabulary** (as EAGLE-3 and FR-Spec do): the heads score only the ``Vd`` most
  frequent tokens of the training data. ``draft_to_target [Vd]`` maps a draft id back to the
  target's id, so drafted tokens are always target ids; scoring ``Vd`` instead of ``V`` rows makes
  training and drafting cheap and keeps the shipped weights small.
- **Frozen target head**: heads end in the target's own ``lm_head`` rows of the draft vocabulary,
  read from the target at load time rather than stored, so a checkpoint only holds what was
  trained.
- **Target fingerprint**: ``config.json`` records the target's hidden size, vocabulary size and a
  checksum of its ``lm_head``; loading onto a different target fails with a clear error instead of
  drafting garbage.
- **Weights by name**: ``drafters/weights/<name>/`` holds the weights trained for the embedded
  model; ``resolve_weights(name_or_path)`` finds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from drafters.draft_layer import DRAFT_PANELS
from specdec.engine import linear
from specdec.target import target_fingerprint, target_head_weight
from specdec.tree import DraftTree

WEIGHTS_DIR = Path(__file__).parent / "weights"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def check_target(config: dict, target, name: str) -> None:
    """Raise a ValueError naming the mismatch when ``target`` is not the one trained on."""
    expected = config["target"]
    actual = target_fingerprint(target)
    for key, what in (("hidden_size", "hidden size"), ("vocab_size", "vocabulary size")):
        if expected[key] != actual[key]:
            raise ValueError(
                f"{name} weights were trained for a target with {what} {expected[key]}, but this "
                f"target has {actual[key]}: train them for this target (specdec train ...)"
            )
    if expected["lm_head_sha256"] != actual["lm_head_sha256"]:
        raise ValueError(
            f"{name} weights were trained for a different target (lm_head checksum "
            f"{expected['lm_head_sha256']}, this target's is {actual['lm_head_sha256']}; trained on "
            f"{expected.get('name', 'an unnamed model')}): train them for this target "
            f"(specdec train ...)"
        )


def resolve_weights(name_or_path: str | Path) -> Path:
    """A folder with config.json: a path, or the name of shipped weights in drafters/weights/."""
    path = Path(name_or_path)
    if (path / CONFIG_NAME).is_file():
        return path
    shipped = WEIGHTS_DIR / str(name_or_path)
    if (shipped / CONFIG_NAME).is_file():
        return shipped
    names = sorted(p.name for p in WEIGHTS_DIR.glob("*") if (p / CONFIG_NAME).is_file())
    raise FileNotFoundError(
        f"no trained weights at {name_or_path!r}: give a folder with {CONFIG_NAME} and "
        f"{WEIGHTS_NAME} (from specdec train), or one of the shipped names: {', '.join(names)}"
    )


def read_config(folder: Path, kind: str) -> dict:
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("kind") != kind:
        raise ValueError(f"{folder} holds {config.get('kind')!r} weights, not {kind!r}")
    return config


def write_config(folder: Path, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def draft_head_weight(target, draft_to_target: torch.Tensor) -> torch.Tensor:
    """[Vd, H] frozen rows of the target's lm_head for the draft vocabulary."""
    weight = target_head_weight(target).detach()
    return weight[draft_to_target.to(weight.device)].float().clone()


def target_to_draft_map(draft_to_target: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[V] the draft id of each target id, -1 outside the draft vocabulary."""
    mapping = torch.full((vocab_size,), -1, dtype=torch.long)
    mapping[draft_to_target.cpu()] = torch.arange(draft_to_target.numel())
    return mapping


class ResBlock(nn.Module):
    """x + SiLU(W x + b), W zero-initialised so a fresh block is the identity (as in Medusa)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(linear(x, self.linear.weight, self.linear.bias, DRAFT_PANELS))


def keep_likeliest(tree: DraftTree, count: int) -> DraftTree:
    """The ``count`` nodes of ``tree`` with the highest ``node_scores`` (ties: drafting order).
    Path scores never exceed the parent's and parents come first, so every kept node's ancestors
    are kept."""
    if len(tree) <= count:
        return tree
    scores = tree.node_scores.tolist()
    order = sorted(range(len(tree)), key=lambda i: (-scores[i], i))
    return tree.prune(order[:count])


def rank_tree_children(paths: list[list[int]]) -> tuple[list[tuple[int, ...]], dict]:
    """Nodes of a tree of top-k rank paths in drafting order, and each node's parent.

    ``paths`` such as ``[[0], [1], [0, 0], [0, 1]]`` (Medusa's format: the i-th entry of a path is
    the rank, at depth i + 1, of the token chosen below the previous one). Every prefix of a path
    must be in the tree too. Returns the paths sorted by depth then rank, and a dict from path to
    the index of its parent path (-1 for depth-1 nodes).
    """
    nodes = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
    if not nodes or any(len(p) == 0 for p in nodes):
        raise ValueError("a rank tree needs non-empty paths, e.g. [[0], [1], [0, 0]]")
    index = {p: i for i, p in enumerate(nodes)}
    parent = {}
    for p in nodes:
        if min(p) < 0:
            raise ValueError(f"path {list(p)} has a negative rank")
        if len(p) > 1 and p[:-1] not in index:
            raise ValueError(f"path {list(p)} needs its prefix {list(p[:-1])} in the tree too")
        parent[p] = index[p[:-1]] if len(p) > 1 else -1
    return nodes, parent


class TrainedModule(nn.Module):
    """Base of the trainable drafter modules: save/load of trained parameters + draft vocabulary.

    Subclasses set ``kind`` and build their layers in ``__init__(config, draft_to_target,
    target)``. Parameters that require grad are what training changes and what is saved (float16
    on disk, float32 in memory); the frozen head rows come from the target at load time.
    """

    kind: str = ""

    def __init__(self, config: dict, draft_to_target: torch.Tensor, target):
        super().__init__()
        self.config = config
        self.register_buffer("draft_to_target", draft_to_target.long().cpu(), persistent=False)
        self.register_buffer("target_to_draft",
                             target_to_draft_map(self.draft_to_target, config["target"]["vocab_size"]),
                             persistent=False)

    @classmethod
    def base_config(cls, target, draft_to_target: torch.Tensor, **options) -> dict:
        fingerprint = target_fingerprint(target)
        source = str(getattr(target.config, "_name_or_path", "") or type(target).__name__)
        fingerprint["name"] = Path(source).name  # not the local folder it was loaded from
        return {"kind": cls.kind, "target": fingerprint, "draft_vocab": int(draft_to_target.numel()),
                **options}

    def trained_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        write_config(folder, self.config)
        tensors = {name: t.half().contiguous().cpu() for name, t in self.trained_state().items()}
        tensors["draft_to_target"] = self.draft_to_target.int().contiguous()
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, target) -> "TrainedModule":
        """Load trained weights (a folder, or a shipped name) onto ``target``; a ValueError says
        what differs when they were trained for another target."""
        from safetensors.torch import load_file

        folder = resolve_weights(name_or_path)
        config = read_config(folder, cls.kind)
        check_target(config, target, f"{cls.kind} ({folder})")
        tensors = load_file(folder / WEIGHTS_NAME)
        module = cls(config, tensors.pop("draft_to_target").long(), target)
        expected = set(module.trained_state())
        if set(tensors) != expected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not fit a {cls.kind} built from its "
                             f"config.json: missing {sorted(expected - set(tensors))}, "
                             f"unexpected {sorted(set(tensors) - expected)}")
        module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        device = target_head_weight(target).device
        return module.to(device).eval()


def distillation_loss(draft_logits: torch.Tensor, label_ids: torch.Tensor,
                      teacher_ids: torch.Tensor, teacher_probs: torch.Tensor, valid: torch.Tensor,
                      loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, top-1 agreement with the teacher) over the valid positions.

    draft_logits [..., Vd]; label_ids [...] next data token as a draft id (-1 outside the draft
    vocabulary); teacher_ids / teacher_probs [..., K] the target's top-K next tokens as draft ids
    (-1 outside) and their probabilities; valid [...] bool. ``loss`` "ce": cross-entropy on the
    data token (Medusa-1, Hydra); "kl": cross-entropy on the teacher's distribution, i.e. KL up to
    a constant (Medusa-2 self-distillation, Hydra++).
    """
    log_q = torch.log_softmax(draft_logits.float(), -1)  # [..., Vd]
    if loss == "ce":
        keep = valid & (label_ids >= 0)
        per_position = -log_q.gather(-1, label_ids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    elif loss == "kl":
        in_vocab = teacher_ids >= 0  # [..., K]
        weights = teacher_probs * in_vocab
        keep = valid & in_vocab.any(-1)
        per_position = -(weights * log_q.gather(-1, teacher_ids.clamp(min=0))).sum(-1)
    else:
        raise ValueError(f"loss must be 'ce' or 'kl', got {loss!r}")
    denom = keep.sum().clamp(min=1)
    value = (per_position * keep).sum() / denom
    agree = ((draft_logits.argmax(-1) == teacher_ids[..., 0]) & valid).sum() / valid.sum().clamp(min=1)
    return value, agree.detach()
