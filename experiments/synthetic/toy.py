"""The toy world of the synthetic consolidation experiment: two genuinely different skills, two experts.

`prepare(out, ToyConfig(), seed)` builds, under `out` (the recipe reads `<run_dir>/models/`):

    base/                    a tiny Llama (hidden 64, 2 layers) briefly trained on both skills' formats
    expert_add/              base fine-tuned on multi-digit addition     ("05+37=" -> "240": 42, reversed)
    expert_rev/              base fine-tuned on string reversal          ("rev:abcd=" -> "dcba")
    calib.jsonl              calibration prompts of both skills with gold responses and a domain tag
    eval_add.jsonl, eval_rev.jsonl, tasks/add.yaml, tasks/rev.yaml   held-out exact-match tasks

Every model folder holds the character tokenizer (`build_tokenizer`, also used by the tests and
benchmarks). Building is idempotent: a finished folder (marked by DONE, which records the config and
seed) is reused; any change rebuilds it. `run.py` then runs the recipe through `distill run`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>"]
CHARS = list("0123456789+=:") + [chr(c) for c in range(ord("a"), ord("z") + 1)]


@dataclass(frozen=True)
class ToyConfig:
    """Every setting of the toy world, documented once."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    # Initial weight std. transformers' default (0.02) suits hidden ~1,000; at hidden 64 it leaves the
    # add expert on a loss plateau (~1.16 nats/token) for a random 190 to 800+ steps, so whether it
    # learnt in a fixed budget was luck (seed, thread count). hidden ** -0.5: 110-290 steps.
    init_std: float = 0.125
    digits: int = 2  # addition operands have this many digits (zero-padded)
    reverse_len: int = 5  # reversal strings have 2 to this many letters
    base_steps: int = 100  # the base: brief, lr decaying linearly from the start (formats, not skills)
    expert_steps: int = 700  # each expert: full lr for `expert_hold` of the steps, then linear decay
    expert_hold: float = 0.5  # covers the add plateau (<= 290 steps over 12 seed pairs) with margin
    warmup_steps: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    calib_samples: int = 8192  # calibration prompts (half per skill)
    eval_samples: int = 200  # held-out eval prompts per skill


def build_tokenizer():
    """A character-level PreTrainedTokenizerFast: BOS prepended, EOS/pad defined (<pad>=0, <s>=1, </s>=2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="left")


def build_model(cfg: ToyConfig, vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 4,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.heads, max_position_embeddings=64, tie_word_embeddings=True,
                         initializer_range=cfg.init_std, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config)


# ---------------------------------------------------------------- the two skills


def make_add(rng: random.Random, digits: int) -> tuple[str, str]:
    """Multi-digit addition on fixed-width operands, the sum written least-significant digit first.

    "05+37=" -> "240" (42, zero-padded to digits+1, reversed). Fixed widths and the
    reversed sum make every answer digit depend on two operand digits at fixed
    positions plus the carry just written, which a tiny causal transformer learns in a
    few hundred steps (the usual order needs carry look-ahead and far longer training).
    """
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    return f"{a:0{digits}d}+{b:0{digits}d}=", f"{a + b:0{digits + 1}d}"[::-1]


def make_rev(rng: random.Random, max_len: int) -> tuple[str, str]:
    n = rng.randint(2, max_len)
    s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))
    return f"rev:{s}=", s[::-1]


SKILLS = {"add": lambda rng, c: make_add(rng, c.digits), "rev": lambda rng, c: make_rev(rng, c.reverse_len)}


def draw(skill: str, n: int, cfg: ToyConfig, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """n distinct examples of `skill` whose prompts are not in `exclude`."""
    rng, seen, out = random.Random(f"{skill}-{seed}"), set(exclude), []
    attempts = 0
    while len(out) < n and attempts < 100 * n:
        attempts += 1
        prompt, target = SKILLS[skill](rng, cfg)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "response": target, "target": target, "domain": skill})
    return out


# ---------------------------------------------------------------- supervised training


def _batch(tok, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (response + EOS only; -100 elsewhere)."""
    seqs, masks = [], []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        a = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_token_id)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        labels[i, : len(s)] = torch.where(torch.tensor(m) == 1, torch.tensor(s), torch.tensor(-100))
    return ids, attn, labels


def lr_factor(step: int, steps: int, warmup: int, hold: float) -> float:
    """Linear warmup, full lr for the first `hold` fraction of the steps, then linear decay to 5%."""
    return min(1.0, (step + 1) / warmup) * max(0.05, min(1.0, (1 - step / steps) / (1 - hold)))


def train_sft(model, tok, skills: list[str], steps: int, hold: float, cfg: ToyConfig, seed: int) -> list[float]:
    """Plain next-token training on the response tokens of freshly drawn examples; returns the losses."""
    from distill.progress import track

    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg.warmup_steps, hold))
    model.train()
    losses = []
    for _ in track(range(steps), desc=f"sft {'+'.join(skills)}", unit="steps", leave=False):
        rows = [{"prompt": p, "response": r} for p, r in
                (SKILLS[rng.choice(skills)](rng, cfg) for _ in range(cfg.batch_size))]
        ids, attn, labels = _batch(tok, rows)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def _curve(losses: list[float], every: int = 100) -> str:
    """Mean loss per `every` steps, for the build log: a plateau that never breaks shows here."""
    return " ".join(f"{sum(losses[i:i + every]) / len(losses[i:i + every]):.2f}" for i in range(0, len(losses), every))


# ---------------------------------------------------------------- files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _task_yaml(name: str, data: str, max_new_tokens: int) -> str:
    return (f"name: {name}\nkind: generate_exact\ndataset: {data}\nprompt_field: prompt\n"
            f"target_field: target\nmax_new_tokens: {max_new_tokens}\n")


def _write_data(out: Path, cfg: ToyConfig, seed: int) -> None:
    """calib.jsonl (both skills, shuffled) and per skill a held-out eval set and its task spec."""
    calib, tasks = [], out / "tasks"
    tasks.mkdir()
    max_new = {"add": cfg.digits + 3, "rev": cfg.reverse_len + 2}
    for skill in ("add", "rev"):
        eval_rows = draw(skill, cfg.eval_samples, cfg, seed + 100)
        calib += draw(skill, cfg.calib_samples // 2, cfg, seed + 200, exclude={r["prompt"] for r in eval_rows})
        _write_jsonl(out / f"eval_{skill}.jsonl", eval_rows)
        (tasks / f"{skill}.yaml").write_text(_task_yaml(skill, f"../eval_{skill}.jsonl", max_new[skill]))
    random.Random(seed).shuffle(calib)
    _write_jsonl(out / "calib.jsonl", calib)


def prepare(out: Path, cfg: ToyConfig, seed: int, log=print) -> Path:
    """Build tokenizer, base, experts and data under `out` (idempotent; rebuilt when cfg or seed change)."""
    from transformers import AutoModelForCausalLM

    out = Path(out)
    stamp = json.dumps({"seed": seed, **dataclasses.asdict(cfg)}, sort_keys=True)
    if (out / "DONE").exists() and (out / "DONE").read_text() == stamp:
        log(f"toy: reusing {out}")
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = build_tokenizer()
    base = build_model(cfg, len(tok), seed)
    losses = train_sft(base, tok, ["add", "rev"], cfg.base_steps, 0.0, cfg, seed)
    log(f"toy: base trained on both formats ({cfg.base_steps} steps), loss per 100 steps: {_curve(losses)}")
    base.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    for skill in ("add", "rev"):
        expert = AutoModelForCausalLM.from_pretrained(tmp / "base")
        losses = train_sft(expert, tok, [skill], cfg.expert_steps, cfg.expert_hold, cfg, seed + 1 + len(skill))
        log(f"toy: expert_{skill} fine-tuned ({cfg.expert_steps} steps), loss per 100 steps: {_curve(losses)}")
        expert.save_pretrained(tmp / f"expert_{skill}")
        tok.save_pretrained(tmp / f"expert_{skill}")
    _write_data(tmp, cfg, seed)
    (tmp / "DONE").write_text(stamp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
