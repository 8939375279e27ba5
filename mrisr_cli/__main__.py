"""`python -m mrisr_cli` runs the same app as the `mrisr` console script."""

from mrisr_cli.cli import main

if __name__ == "__main__":
    main()
