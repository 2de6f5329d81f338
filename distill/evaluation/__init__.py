"""`distill eval`: score models on the LLM-Merging competition's validation tasks.

Tasks are data (eval/tasks/*.yaml, see docs/eval.md); each kind has one small
scorer. The public API, used by the CLI's eval stage (distill/stages.py):

    from distill.evaluation import ModelEntry, load_task, evaluate_models, run_harness

    spec = load_task("boolq")                     # or a path: runs/x/eval_tasks/add.yaml
    scores = evaluate_models([ModelEntry("student", lambda: (model, tokenizer))],
                             ["boolq", "mawps"], recipe.eval, Path("runs/x/eval"))
    scores["student"]["boolq"]["accuracy"]

`run_harness` (lm-evaluation-harness bridge) imports lm_eval only when called.
"""

from distill.evaluation.examples import Example, build_examples
from distill.evaluation.harness import harness_record, harness_scores, run_harness
from distill.evaluation.runner import ModelEntry, evaluate_models, run_task
from distill.evaluation.spec import TaskSpec, list_tasks, load_task

__all__ = ["Example", "ModelEntry", "TaskSpec", "build_examples", "evaluate_models", "harness_record", "harness_scores", "list_tasks", "load_task",
           "run_harness", "run_task"]
