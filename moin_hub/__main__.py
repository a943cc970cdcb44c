"""`python -m moin_hub` runs the `moin-hub` command line."""

from .cli import main

if __name__ == "__main__":
    main()
