"""``python -m cribo_utils.figures <figure> [options]``: set up logging and run :func:`cli.main`."""

from cribo_utils.figures.cli import main
from cribo_utils.runtime.logger import setup_logging

if __name__ == "__main__":
    setup_logging(None)
    main()
