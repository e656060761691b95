"""``python -m blackbox_vqa`` runs the ``bbvqa`` command line."""

from __future__ import annotations

from blackbox_vqa.cli.app import main

if __name__ == "__main__":
    main()
