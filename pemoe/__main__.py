"""``python -m pemoe ...``: the ``pemoe`` command (also per rank under ``torchrun ... -m pemoe train ...``)."""

from pemoe.cli import console_main

if __name__ == "__main__":
    console_main()
