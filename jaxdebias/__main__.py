"""``python -m jaxdebias``: the command line (``jaxdebias.cli.main``)."""

from jaxdebias.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
