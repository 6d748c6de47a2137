"""``python -m capcli``, which is also what ``torchrun -m capcli`` runs."""

from capcli.cli import main

if __name__ == "__main__":
    main()
