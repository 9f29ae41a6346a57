"""Entry script for `ray submit cluster.yaml scripts/submit_train.py -- --config job.toml ...`.

`ray submit` copies this file to ~/submit_train.py on the head node and runs it there (cwd: ~),
where ampray is already installed from the checkout shipped by cluster.yaml's file_mounts
(~/ampray). It joins the running cluster (`--address auto`) and forwards every other argument to
`ampray train`. Relative paths (e.g. `--config`) are resolved on the head node, from ~.
"""

from __future__ import annotations

import sys


def main() -> int:
    from ampray.orchestrator.cli import main as ampray_main

    return ampray_main(["train", "--address", "auto", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
