"""Launched by tests/test_multiprocess.py under `accelerate launch` (2 processes): one good step,
then a step whose loss is NaN with finite gradients (a NaN teacher logprob under total variation).
The public step must raise NonFiniteStep and leave the weights exactly as the good step left them.

    accelerate launch --config_file launch/zero2.yaml --num_processes 2 --mixed_precision no \\
        tests/step_probe.py RECIPE OUT.json
"""

import json
import sys

import torch

from distill import batches as B
from distill.cache.store import CacheReader
from distill.config import load_recipe
from distill.step import NonFiniteStep
from distill.train import build_accelerator, build_teachers, build_train_step


def main(recipe_path: str, out_path: str) -> None:
    recipe = load_recipe(recipe_path)
    acc = build_accelerator(recipe)
    reader = CacheReader(recipe.cache.dir)
    codec = reader.codec()
    step, _ = build_train_step(recipe, acc, build_teachers(recipe, reader, codec, acc.device), 10)
    wrapped = step.wrapped
    items = [reader.sample(i) for i in range(len(reader))]
    good = B.collate(items[2 * acc.process_index:2 * acc.process_index + 2], 0)
    bad = B.collate(items[2 * acc.process_index:2 * acc.process_index + 2], 0)
    signal = B.decode_signal(codec, bad.pop("records"))
    signal.logprobs[0, 0, 0] = float("nan")  # the row a NaN in the cache decodes to, on this rank
    bad["signal"] = (signal.ids, signal.logprobs, signal.log_residual)
    n = 1000  # any normaliser, equal on every rank
    step([good], n)
    before = {k: v.clone() for k, v in acc.get_state_dict(wrapped).items()}
    raised = False
    try:
        step([bad], n)
    except NonFiniteStep:
        raised = True
    after = acc.get_state_dict(wrapped)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    if acc.is_main_process:
        with open(out_path, "w") as f:
            json.dump({"raised": raised, "unchanged": unchanged, "tensors": len(before)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
