"""`python -m trainguard`: the same commands as the `trainguard` script."""

from trainguard.cli import main

if __name__ == "__main__":
    main()
