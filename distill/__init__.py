"""distill: consolidate expert LLMs into one student by multi-teacher distillation.

Stages talk through files in a run directory: cache -> train -> eval -> publish.
See README.md for the recipe schema, the cache format and the CLI.
"""

__version__ = "0.1.0"
