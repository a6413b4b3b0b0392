"""`python -m cloister` is the `cloister` command."""

from cloister.cli.main import main

main()
