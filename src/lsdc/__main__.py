"""`python -m lsdc`: the `lsdc` command, for launchers that start a module (torchrun -m lsdc)."""

from lsdc.cli import main

if __name__ == "__main__":
    main()
