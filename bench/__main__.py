"""``python -m pemoe.bench [options]``: the same as ``pemoe bench``."""

from pemoe.bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
