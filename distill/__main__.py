"""Entry point for `python -m distill` and `accelerate launch -m distill train RECIPE`."""

from distill.cli import main

if __name__ == "__main__":
    main()
